"""Judge diagnostics on a demo-world run: where the implicit reward of Eq. 7 comes from, token by token.

Builds the world for one seed, runs the seed stage and one arm (iterative DPO by default), then for each
round's judged answers computes the per-token ``log pi_{t-1} - log pi_init`` grouped by kind of token
(opener, separator, on-/off-topic item, ending, end of turn), and the self-label accuracy (against the
oracle) that other judges would have had on the same pairs: Eq. 7's sum, a per-token clip of the
log-ratio at several bounds, and the per-token mean. Results: ``<out>/diag_<seed>_<arm>.json``; what they
showed is in bench/results/world_trials.md ("A bounded judge?").

    OMP_NUM_THREADS=1 python bench/judge_token_diag.py 2 /tmp/spa-diag [iterative_dpo]
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from spa.demo.arms import ARMS, run_arm, run_seed_stage
from spa.demo.run import build_world, demo_config
from spa.demo.world import (
    ENDINGS,
    GOOD_OPENER,
    GOOD_SEPARATOR,
    OPENERS,
    SEPARATORS,
    TOPICS,
    parse_prompt,
    score,
)
from spa.judges.implicit_reward import auto_length_penalty
from spa.models.loading import load_causal_lm
from spa.models.logprobs import collate, encode_pair
from spa.models.rendering import load_tokenizer

seed = int(sys.argv[1])
out = Path(sys.argv[2])
arm = sys.argv[3] if len(sys.argv) > 3 else "iterative_dpo"
world = build_world(out / f"world_{seed}", seed=seed, echo=lambda m: None)
raw = demo_config(world, out / f"s{seed}" / "base", seed=seed)
base = run_seed_stage(raw)
rows = run_arm(Path(base.run_dir), out / f"s{seed}" / arm, raw, ARMS[arm])
print("win", [round(r["win_rate"], 1) for r in rows], "acc", [r.get("self_label_accuracy") for r in rows[1:]])
run = out / f"s{seed}" / arm


@torch.no_grad()
def token_logps(model, encs, pad):
    res = []
    for i in range(0, len(encs), 64):
        b = collate(encs[i:i + 64], pad)
        lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        lp = lg.gather(-1, b["labels"].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, -1)
        for j, e in enumerate(encs[i:i + 64]):
            s = e.response_start - 1
            res.append(lp[j, s:len(e.input_ids) - 1].double().numpy())
    return res


def cls(word, topic):
    if word == GOOD_OPENER:
        return "opener_good"
    if word in OPENERS:
        return "opener_bad"
    if word == GOOD_SEPARATOR:
        return "sep_good"
    if word in SEPARATORS:
        return "sep_bad"
    if word in ENDINGS:
        return "ending"
    if word in topic:
        return "on_topic"
    return "off_topic" if any(word in ws for ws in TOPICS.values()) else "other"


def clipped_sum(bound):
    return lambda d: np.clip(d, -bound, bound).sum()


tok = load_tokenizer(world / "pi_init")
init = load_causal_lm(world / "pi_init", "float32")
report = {}
for t in (1, 2, 3):
    pol = load_causal_lm(run / f"iter_{t - 1}" / "model", "float32")
    resp = pq.read_table(run / f"iter_{t}" / "responses.parquet").to_pylist()
    P, Y, F = [], [], []
    for r in resp:
        for y, f in zip(r["responses"][:2], r["finish_reasons"][:2], strict=False):
            P.append(r["prompt"])
            Y.append(y)
            F.append(f == "stop")
    encs = [encode_pair(tok, p, y, f) for p, y, f in zip(P, Y, F, strict=False)]
    lp_pol = token_logps(pol, encs, tok.pad_token_id)
    lp_ref = token_logps(init, encs, tok.pad_token_id)
    diffs = [a - b for a, b in zip(lp_pol, lp_ref, strict=False)]
    # per-class mean log-ratio (map tokens to words; word-level tokenizer: one token per word, + EOT)
    by = {}
    for e, d, p, f in zip(encs, diffs, P, F, strict=False):
        toks = tok.convert_ids_to_tokens(e.input_ids[e.response_start:])
        topic = set(TOPICS[parse_prompt(p).topic])
        for w, v in zip(toks, d, strict=False):
            c = cls(w, topic) if not (f and w == toks[-1] and w not in ENDINGS and w not in topic) else "eot"
            by.setdefault(c, []).append(v)
    lens = np.array([e.num_response_tokens - int(f) for e, f in zip(encs, F, strict=False)]).reshape(-1, 2)
    oracle = np.array([score(P[2 * i], Y[2 * i]) - score(P[2 * i], Y[2 * i + 1]) for i in range(len(resp))])
    mask = oracle != 0
    res = {"classes": {c: (round(float(np.mean(v)), 3), round(float(np.std(v)), 3), len(v)) for c, v in by.items()}}
    for name, fn in [("sum", np.sum)] + [(f"clip{c}", clipped_sum(c)) for c in (0.1, 0.25, 0.5, 1.0, 2.0)] + [
            ("mean", np.mean)]:
        r = 0.1 * np.array([fn(d) for d in diffs]).reshape(-1, 2)
        a = auto_length_penalty(torch.tensor(r), torch.tensor(lens), signed=True) if name != "mean" else 0.0
        s = r - a * lens
        lab = np.sign(s[:, 0] - s[:, 1])
        acc = float(np.mean((lab[mask] * np.sign(oracle[mask])) > 0))
        res[name] = round(acc, 3)
    report[t] = res
    print(t, json.dumps(res))
(out / f"diag_{seed}_{arm}.json").write_text(json.dumps(report, indent=1))
