"""``spa judge --iteration t``: label each response pair with the implicit reward (Eq. 7, 8, 13).

Variants (VARIANTS.md 5-6): best-vs-worst of ``n`` samples with a fixed or automatic length
penalty (DICE), an external reward model or an LLM judge instead of the implicit reward, and
label-noise injection (``judge.flip_fraction``).

``p = sigma(r(y1) - r(y2))`` with ``r(y) = beta*[log pi_{t-1}(y|x) - log pi_ref(y|x)]``,
``pi_ref = pi_init`` by default (or the previous model, or none). Streams through the
responses in batches: memory does not grow with the number of prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spa.config import SPAConfig
from spa.errors import UntrustedSampledLogps
from spa.run.artifacts import (
    atomic_path,
    conform,
    iter_chunks,
    merge_parquet,
    num_rows,
    write_table,
    write_text_atomic,
)
from spa.run.layout import RunLayout, model_dir
from spa.run.sharding import parse_shard, shard_bounds, shard_key, shard_path
from spa.schemas import JUDGMENTS
from spa.stages.runner import StageResult, require, run_stage

SECTIONS = ["model", "judge"]

JUDGMENT_SCHEMA = pa.schema(list(JUDGMENTS.schema) + [
    pa.field("chosen_finished", pa.bool_()), pa.field("rejected_finished", pa.bool_()),
    pa.field("chosen_tokens", pa.int32()), pa.field("rejected_tokens", pa.int32()),
    pa.field("first_is_chosen", pa.bool_()), pa.field("dropped", pa.bool_()),
    pa.field("chosen_index", pa.int32()), pa.field("rejected_index", pa.int32()),
    pa.field("flipped", pa.bool_()),
])


def reference_dir(cfg: SPAConfig, t: int) -> Path | None:
    """The judge's reference: pi_init (paper), pi_{t-1}'s predecessor, or none."""
    if cfg.judge.reference == "none":
        return None
    if cfg.judge.reference == "previous" and t >= 2:
        return model_dir(cfg, t - 2)
    return Path(cfg.model.pi_init)


def judge_name(cfg: SPAConfig, length_penalty: float | None = None) -> str:
    j = cfg.judge
    a = j.length_penalty if length_penalty is None else length_penalty
    a_text = f"{a:.6g}" if isinstance(a, float | int) else str(a)
    if j.type == "implicit":
        reuse = ",policy_logps=from_sampling" if j.policy_logps == "from_sampling" else ""
        base = f"implicit(ref={j.reference},beta={j.beta},length_penalty={a_text}{reuse})"
    elif j.type == "external_rm":
        base = f"external_rm({Path(j.reward_model or '').name},length_penalty={a_text})"
    else:
        base = f"llm_judge({Path(j.llm_judge_model or cfg.model.pi_init).name},both_orders)"
    if j.select == "best_worst":
        base += f"+best_worst(n={cfg.sample.n})"
    if j.flip_fraction:
        base += f"+flip({j.flip_fraction})"
    return base


@dataclass
class Scores:
    """Per-candidate numbers of one chunk, ``[P, k]`` arrays (``k`` candidates per prompt)."""

    reward: np.ndarray  # without length penalty; NaN where the judge has no per-response reward (LLM judge)
    policy: np.ndarray  # log pi_{t-1}(y|x); NaN for external judges
    ref: np.ndarray  # log pi_ref(y|x); NaN without a reference
    lens: np.ndarray  # response tokens (the policy tokenizer's count)
    p_first: np.ndarray | None = None  # pairwise judges (LLM judge): p(y1 > y2) directly



@dataclass
class Sampled:
    """What the sampler recorded for the candidates (``[P][k]``): the exact token ids it drew (the stop token
    included when the response finished) and the sum of their raw log-probs under pi_{t-1}."""

    token_ids: list[list[list[int]]]
    logps: np.ndarray


SAMPLED_COLUMNS = ("token_ids", "sampled_logps", "logp_dtype")


def sampled_candidates(rows: pa.Table, k: int, judge_dtype: str, where: str, first_row: int = 0) -> Sampled:
    """The recorded sampling log-probs of the first ``k`` responses per row, refused (one clear error naming the
    file and row) where they cannot stand in for rescoring pi_{t-1} (issue P3): not recorded (responses from a
    sampler that did not keep them), or computed in another precision than the judge's (``logp_dtype`` vs the
    judge's model dtype: mixing precisions shifts Eq. 7's margins).

    Responses whose sampled ids are not what the rendering path gives for their text (a non-canonical
    tokenization, a special token dropped by decoding, a stop on EOS where the template closes turns with another
    token) are not refused: :meth:`Judges.score` rescores those with pi_{t-1}.
    """
    missing = [c for c in SAMPLED_COLUMNS if c not in rows.column_names]
    if missing:
        raise UntrustedSampledLogps(
            f"{where}: no sampled log-probs (columns {missing} missing): these responses were written by a sampler "
            "that did not record them; sample again, or set judge.policy_logps: rescore")
    ids_col, logp_col = rows.column("token_ids").to_pylist(), rows.column("sampled_logps").to_pylist()
    for i, (ids, logps, dtype) in enumerate(zip(ids_col, logp_col, rows.column("logp_dtype").to_pylist(),
                                                strict=True)):
        row = f"{where} row {first_row + i}"
        if dtype != judge_dtype:
            raise UntrustedSampledLogps(
                f"{row}: sampled log-probs were computed in {dtype}, the judge runs in {judge_dtype}; mixing "
                "precisions shifts Eq. 7's margins. Set model.dtype so both match, or judge.policy_logps: rescore")
        if ids is None or logps is None or len(ids) < k or len(logps) < k or any(
                x is None or x != x for x in logps[:k]):
            raise UntrustedSampledLogps(f"{row}: sampled log-probs are missing for some responses; sample again "
                                        "or set judge.policy_logps: rescore")
    return Sampled([row[:k] for row in ids_col], np.array([row[:k] for row in logp_col], dtype=np.float64))


class Judges:
    """The models a judge needs, loaded once per file: the implicit reward's policy and reference, an
    external reward model, or an LLM judge (VARIANTS.md 6)."""

    def __init__(self, cfg: SPAConfig, t: int):
        from spa.models.loading import load_causal_lm
        from spa.models.rendering import load_tokenizer

        dtype, trc = cfg.model.dtype, cfg.model.trust_remote_code
        self.cfg, self.t = cfg, t
        policy_dir = model_dir(cfg, t - 1)
        self.tok = load_tokenizer(policy_dir, trc)
        self.policy = self.ref = self.rm = self.llm = None
        self.reuse = cfg.judge.type == "implicit" and cfg.judge.policy_logps == "from_sampling"
        self.policy_dir = policy_dir
        self.stats = {"responses": 0, "policy_rescored": 0}  # with reuse: responses pi_{t-1} had to rescore
        if cfg.judge.type == "implicit":
            # with reuse, pi_{t-1}'s half of Eq. 7 comes from sampling: only the reference runs
            self.policy = None if self.reuse else load_causal_lm(policy_dir, dtype, trust_remote_code=trc)
            ref_dir = reference_dir(cfg, t)
            self.ref = load_causal_lm(ref_dir, dtype, trust_remote_code=trc) if ref_dir is not None else None
        elif cfg.judge.type == "external_rm":
            from spa.judges.reward_model import load_reward_model

            self.rm, self.rm_tok = load_reward_model(cfg.judge.reward_model, dtype, trc)
        else:
            path = cfg.judge.llm_judge_model or cfg.model.pi_init
            self.llm, self.llm_tok = load_causal_lm(path, dtype, trust_remote_code=trc), load_tokenizer(path, trc)

    @property
    def dtype(self) -> str:
        """The precision the judge's models compute in (what recorded sampling log-probs must match)."""
        from spa.models.loading import default_device, resolve_dtype

        model = self.ref if self.ref is not None else self.policy
        dtype = next(model.parameters()).dtype if model is not None else resolve_dtype(self.cfg.model.dtype,
                                                                                       default_device())
        return str(dtype).removeprefix("torch.")

    def inputs(self, rows: pa.Table, where: str, first_row: int = 0):
        """``(prompts, candidates, finished, sampled)`` of one chunk; ``sampled`` only when reusing."""
        prompts, cands, fins = candidates(rows, self.cfg)
        sampled = None
        if self.reuse:
            sampled = sampled_candidates(rows, len(cands[0]) if cands else 2, self.dtype, where, first_row)
        return prompts, cands, fins, sampled

    def score(self, prompts: list[str], cands: list[list[str]], fins: list[list[bool]],
              sampled: Sampled | None = None) -> Scores:
        from spa.models.logprobs import sequence_logps

        cfg = self.cfg
        n, k = len(prompts), len(cands[0]) if cands else 2
        flat_p = [p for p in prompts for _ in range(k)]
        flat_y = [y for row in cands for y in row]
        flat_f = [f for row in fins for f in row]
        bs, ml = cfg.judge.batch_size, cfg.model.max_length
        nan = np.full(n * k, np.nan)
        if self.reuse:
            if sampled is None:
                raise ValueError("judge.policy_logps: from_sampling needs the sampled log-probs of each chunk")
            return self._score_reused(flat_p, flat_y, flat_f, sampled, n, k)
        if self.policy is not None:
            pol, lens = sequence_logps(self.policy, self.tok, flat_p, flat_y, flat_f, bs, ml)
            ref = sequence_logps(self.ref, self.tok, flat_p, flat_y, flat_f, bs, ml)[0] if self.ref is not None else nan
            reward = cfg.judge.beta * (pol - ref) if self.ref is not None else cfg.judge.beta * pol
            return Scores(reward.reshape(n, k), pol.reshape(n, k), ref.reshape(n, k), lens.reshape(n, k))
        lens = np.array([len(self.tok(y, add_special_tokens=False)["input_ids"]) for y in flat_y], np.int32)
        if self.rm is not None:
            from spa.judges.reward_model import reward_scores

            reward = reward_scores(self.rm, self.rm_tok, flat_p, flat_y, bs, ml)
            return Scores(reward.reshape(n, k), nan.reshape(n, k), nan.reshape(n, k), lens.reshape(n, k))
        from spa.judges.llm import pairwise_preference

        p1 = pairwise_preference(self.llm, self.llm_tok, prompts, [c[0] for c in cands], [c[1] for c in cands],
                                 bs, ml)
        return Scores(nan.reshape(n, k), nan.reshape(n, k), nan.reshape(n, k), lens.reshape(n, k), p_first=p1)

    def _score_reused(self, flat_p: list[str], flat_y: list[str], flat_f: list[bool], sampled: Sampled, n: int,
                      k: int) -> Scores:
        """Eq. 7 with log pi_{t-1} taken from sampling wherever the sampled ids are exactly the ids the rendering
        path gives the response text (the ids every later stage uses); the other responses are rescored with
        pi_{t-1} (loaded on first need). The reference always scores the rendered ids, as in full rescoring."""
        from spa.models.loading import load_causal_lm
        from spa.models.logprobs import encode_pair, encoded_logps

        cfg = self.cfg
        encoded = [encode_pair(self.tok, p, y, f, cfg.model.max_length, row=i // k)
                   for i, (p, y, f) in enumerate(zip(flat_p, flat_y, flat_f, strict=True))]
        flat_ids = [ids for row in sampled.token_ids for ids in row]
        pol = sampled.logps.reshape(-1).copy()
        redo = [i for i, (e, ids) in enumerate(zip(encoded, flat_ids, strict=True))
                if e.input_ids[e.response_start:] != list(ids)]
        if redo:
            if self.policy is None:
                self.policy = load_causal_lm(self.policy_dir, cfg.model.dtype,
                                             trust_remote_code=cfg.model.trust_remote_code)
            pol[redo] = encoded_logps(self.policy, [encoded[i] for i in redo], self.tok.pad_token_id,
                                      cfg.judge.batch_size)[0]
        self.stats["responses"] += len(encoded)
        self.stats["policy_rescored"] += len(redo)
        lens = np.array([e.num_response_tokens for e in encoded], dtype=np.int32)
        if self.ref is None:
            ref = np.full(n * k, np.nan)
            reward = cfg.judge.beta * pol
        else:
            ref = encoded_logps(self.ref, encoded, self.tok.pad_token_id, cfg.judge.batch_size)[0]
            reward = cfg.judge.beta * (pol - ref)
        return Scores(reward.reshape(n, k), pol.reshape(n, k), ref.reshape(n, k), lens.reshape(n, k))


def candidates(rows: pa.Table, cfg: SPAConfig) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The responses a judge compares: the first two (paper), or all ``n`` for best-vs-worst."""
    prompts = rows.column("prompt").to_pylist()
    responses = rows.column("responses").to_pylist()
    reasons = rows.column("finish_reasons").to_pylist()
    k = 2 if cfg.judge.select == "first_two" else cfg.sample.n
    for i, r in enumerate(responses):
        if len(r) < k:
            raise ValueError(f"responses row {i}: {len(r)} responses; this judge needs {k} per prompt "
                             f"(sample.n = {cfg.sample.n}, judge.select = {cfg.judge.select})")
    return prompts, [r[:k] for r in responses], [[x == "stop" for x in f[:k]] for f in reasons]


def flip_mask(prompt_ids: list[str], fraction: float, seed: int, t: int) -> np.ndarray:
    """Label-noise injection: each prompt's label flips with probability ``fraction``, decided by a
    hash of (seed, iteration, prompt id) so that shards and reruns flip the same rows."""
    if fraction <= 0:
        return np.zeros(len(prompt_ids), dtype=bool)
    u = [int.from_bytes(hashlib.sha256(f"{seed}\0{t}\0{pid}".encode()).digest()[:8], "little") / 2**64
         for pid in prompt_ids]
    return np.array(u) < fraction


def label_rows(rows: pa.Table, scores: Scores, cands: list[list[str]], fins: list[list[bool]], cfg: SPAConfig,
               t: int, length_penalty: float) -> pa.Table:
    """Eq. 7-8 (or best-vs-worst selection) on scored candidates -> judgments rows."""
    import torch

    from spa.judges.implicit_reward import select_pairs

    n = len(cands)
    a = length_penalty
    score = scores.reward - a * scores.lens
    if cfg.judge.select == "best_worst":
        ci, ri = (x.numpy() for x in select_pairs(torch.from_numpy(scores.reward), torch.from_numpy(scores.lens), a))
        rows_idx = np.arange(n)
        p_chosen = 1.0 / (1.0 + np.exp(-(score[rows_idx, ci] - score[rows_idx, ri])))
        tie = ci == ri
    else:
        p1 = scores.p_first if scores.p_first is not None else 1.0 / (1.0 + np.exp(-(score[:, 0] - score[:, 1])))
        tie = p1 == 0.5
        first = p1 > 0.5  # Eq. 8; on a tie y1 stays first and the row is kept out of training
        ci = np.where(first | tie, 0, 1)
        ri = 1 - ci
        p_chosen = np.where(first | tie, p1, 1.0 - p1)
    identical = np.array([c[i] == c[j] for c, i, j in zip(cands, ci, ri, strict=True)]) | np.array(
        [i == j for i, j in zip(ci, ri, strict=True)])
    tie = tie | identical  # identical texts are a tie even if padding nudged the numbers
    p_chosen = np.where(tie, 0.5, p_chosen)
    ri = np.where(tie & (ci == ri), (ci + 1) % len(cands[0]), ri)  # a tie row still names two responses
    flipped = flip_mask(rows.column("prompt_id").to_pylist(), cfg.judge.flip_fraction, cfg.sample.seed, t) & ~tie
    ci, ri = np.where(flipped, ri, ci), np.where(flipped, ci, ri)
    p_chosen = np.where(flipped, 1.0 - p_chosen, p_chosen)
    rows_idx = np.arange(n)

    def chosen_of(m: np.ndarray) -> np.ndarray:
        return m[rows_idx, ci]

    def rejected_of(m: np.ndarray) -> np.ndarray:
        return m[rows_idx, ri]

    text = np.empty((n, len(cands[0]) if n else 2), dtype=object)
    for i, row in enumerate(cands):
        text[i, :] = row
    fin = np.array(fins, dtype=bool).reshape(n, -1) if n else np.zeros((0, 2), dtype=bool)
    truncated = ~(chosen_of(fin) & rejected_of(fin))
    return pa.table({
        "prompt_id": rows.column("prompt_id"),
        "prompt": rows.column("prompt"),
        "chosen": pa.array(chosen_of(text).tolist(), pa.string()),
        "rejected": pa.array(rejected_of(text).tolist(), pa.string()),
        "p_chosen": pa.array(p_chosen, pa.float64()),
        "policy_logp_chosen": pa.array(chosen_of(scores.policy), pa.float64(), from_pandas=True),
        "policy_logp_rejected": pa.array(rejected_of(scores.policy), pa.float64(), from_pandas=True),
        "ref_logp_chosen": pa.array(chosen_of(scores.ref), pa.float64(), from_pandas=True),
        "ref_logp_rejected": pa.array(rejected_of(scores.ref), pa.float64(), from_pandas=True),
        "tie": pa.array(tie, pa.bool_()),
        "judge": pa.array([judge_name(cfg, a)] * n, pa.string()),
        "chosen_finished": pa.array(chosen_of(fin), pa.bool_()),
        "rejected_finished": pa.array(rejected_of(fin), pa.bool_()),
        "chosen_tokens": pa.array(chosen_of(scores.lens), pa.int32()),
        "rejected_tokens": pa.array(rejected_of(scores.lens), pa.int32()),
        "first_is_chosen": pa.array(ci < ri, pa.bool_()),
        "dropped": pa.array(truncated & cfg.judge.drop_truncated, pa.bool_()),
        "chosen_index": pa.array(ci, pa.int32()),
        "rejected_index": pa.array(ri, pa.int32()),
        "flipped": pa.array(flipped, pa.bool_()),
    })


def judge_rows(rows: pa.Table, judges: Judges, cfg: SPAConfig, t: int, length_penalty: float | None = None) -> pa.Table:
    """Judge one chunk of ``responses.parquet`` rows with a fixed length penalty (default: the config's number)."""
    a = float(cfg.judge.length_penalty) if length_penalty is None else length_penalty
    prompts, cands, fins, sampled = judges.inputs(rows, "responses")
    return label_rows(rows, judges.score(prompts, cands, fins, sampled), cands, fins, cfg, t, a)


def judge_file(cfg: SPAConfig, t: int, responses: Path, out: Path, shard: tuple[int, int] | None = None,
               progress: bool = True, stats: dict | None = None) -> float:
    """Stream (a chunk-aligned shard of) ``responses`` through the judge into ``out`` (atomic).

    With ``judge.length_penalty: auto`` a first pass scores every chunk and keeps only the numbers
    (no texts), the penalty is solved on all of them (:func:`spa.judges.implicit_reward.auto_length_penalty`), and a
    second pass labels. Returns the length penalty used.
    """
    import torch
    from tqdm.auto import tqdm

    from spa.judges.implicit_reward import auto_length_penalty

    start, stop = shard_bounds(num_rows(responses), shard, cfg.judge.chunk_rows)
    auto = cfg.judge.length_penalty == "auto"
    if auto and shard is not None:
        raise ValueError("judge.length_penalty 'auto' is solved over the whole set: run the judge unsharded")
    judges = Judges(cfg, t)
    chunks = lambda: iter_chunks(responses, "responses", cfg.judge.chunk_rows, start, stop)  # noqa: E731
    stored: list[Scores] = []
    a = 0.0 if auto else float(cfg.judge.length_penalty)
    if auto:
        with tqdm(total=stop - start, desc=f"judge iter {t} (scoring)", unit="prompt", disable=not progress) as bar:
            for first, rows in chunks():
                stored.append(judges.score(*judges.inputs(rows, str(responses), first)))
                bar.update(rows.num_rows)
        if stored:
            a = auto_length_penalty(torch.from_numpy(np.concatenate([s.reward for s in stored])),
                                    torch.from_numpy(np.concatenate([s.lens for s in stored]).astype(np.float64)),
                                    signed=cfg.judge.length_penalty_sign == "signed")
    bar = tqdm(total=stop - start, desc=f"judge iter {t}", unit="prompt", disable=not progress)
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, JUDGMENT_SCHEMA) as writer:
            for k, (first, rows) in enumerate(chunks()):
                prompts, cands, fins, sampled = judges.inputs(rows, str(responses), first)
                scores = stored[k] if auto else judges.score(prompts, cands, fins, sampled)
                table = conform(label_rows(rows, scores, cands, fins, cfg, t, a), JUDGMENTS, str(out), first)
                writer.write_table(table.cast(JUDGMENT_SCHEMA))
                bar.update(table.num_rows)
    bar.close()
    if stats is not None and judges.reuse:
        stats.update(judges.stats)
    return a


def _summary(path: Path) -> dict[str, Any]:
    """Counts over the written judgments, reading only their small columns (never the texts: bench P6)."""
    from spa.judges.diagnostics import judge_length_preference

    names = set(pq.read_schema(path).names)
    cols = [c for c in ("chosen_finished", "rejected_finished", "p_chosen", "tie", "dropped", "flipped",
                        "chosen_tokens", "rejected_tokens") if c in names]
    table = pq.read_table(path, columns=cols)
    column = lambda c: np.asarray(table.column(c).to_numpy(zero_copy_only=False))  # noqa: E731
    both = column("chosen_finished").astype(bool) & column("rejected_finished").astype(bool)
    p = table.column("p_chosen").to_numpy()
    count = lambda c: int(np.sum(column(c))) if c in cols else 0  # noqa: E731
    labelled = ~column("tie").astype(bool)
    chosen_len, rejected_len = column("chosen_tokens"), column("rejected_tokens")
    return {
        "pairs": table.num_rows,
        "ties": count("tie"),
        "truncated_pairs": int(np.sum(~both)),
        "dropped": count("dropped"),
        "mean_p_chosen": round(float(np.mean(p)), 4) if table.num_rows else None,
        "flipped": count("flipped"),
        "mean_length": round(float(np.mean(np.concatenate([chosen_len, rejected_len]))), 3) if table.num_rows else None,
        **judge_length_preference(chosen_len[labelled], rejected_len[labelled]),
    }


def oracle_summary(cfg: SPAConfig, judgments: Path, out: Path) -> dict[str, Any]:
    """With ``judge.oracle``: its verdict on every label (written to ``out``) and what they say of the judge.

    Diagnostics only: the verdicts never reach training. Ties are left out (they are not trained on)."""
    from spa.evaluation.annotators import annotate, load_annotator
    from spa.judges.diagnostics import oracle_label_quality

    table = pq.read_table(judgments, columns=["prompt_id", "prompt", "chosen", "rejected", "tie",
                                              "chosen_tokens", "rejected_tokens"])
    table = table.filter(pc.invert(table.column("tie")))
    verdicts = annotate(load_annotator(cfg.judge.oracle), table.column("prompt").to_pylist(),
                        table.column("chosen").to_pylist(), table.column("rejected").to_pylist())
    write_table(pa.table({"prompt_id": table.column("prompt_id"), "oracle_verdict": pa.array(verdicts, pa.float64())}),
                out)
    return oracle_label_quality(verdicts, table.column("chosen_tokens").to_numpy(),
                                table.column("rejected_tokens").to_numpy())


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print, shard: str | None = None,
        merge: int | None = None) -> StageResult:
    """Judge iteration ``t`` whole, one shard of it (``shard="i/N"``), or merge ``merge`` shards."""
    layout = RunLayout(Path(cfg.run_dir))
    responses = require(layout.responses(t), "responses", f"spa sample --iteration {t}")
    policy = require(model_dir(cfg, t - 1), f"pi_{t-1}", "spa seed" if t == 1 else f"spa train --iteration {t-1}")
    ref = reference_dir(cfg, t)
    inputs = [responses, policy] + ([require(ref, "the judge's reference model", "spa seed / spa train")] if ref else [])
    part = parse_shard(shard) if shard else None
    final = layout.judgments(t)
    output = final if part is None else shard_path(final, part)
    whole = part is None  # the whole set (judged at once or merged): its summary and diagnostics are written
    diagnostics = [layout.judge_summary(t)] + ([layout.oracle_verdicts(t)] if cfg.judge.oracle else [])

    def finish(length_penalty: float, run_info: dict[str, Any]) -> dict[str, Any]:
        """Write ``judge_summary.json`` (numbers of the judgments alone: a merged set and the same set judged
        at once write the same bytes) and return it with ``run_info`` (how it was run) for the manifest."""
        summary = _summary(final) | {"length_penalty": length_penalty}
        if cfg.judge.oracle:
            summary |= oracle_summary(cfg, final, layout.oracle_verdicts(t))
        write_text_atomic(layout.judge_summary(t), json.dumps(summary, indent=2))
        return summary | run_info

    if merge:
        parts = [shard_path(final, (i, merge)) for i in range(merge)]

        def body() -> dict[str, Any]:
            for p in parts:
                require(p, "a judge shard", f"spa judge --iteration {t} --shard i/{merge}")
            merge_parquet(parts, final, "judgments")
            return finish(float(cfg.judge.length_penalty), {"shards": merge})  # 'auto' is refused when sharded
    else:
        def body() -> dict[str, Any]:
            stats: dict[str, int] = {}
            a = judge_file(cfg, t, responses, output, part, stats=stats)
            if stats.get("policy_rescored"):
                share = stats["policy_rescored"] / max(1, stats["responses"])
                echo(f"[judge/{t}] policy_logps from_sampling: {stats['policy_rescored']} of {stats['responses']} "
                     f"responses ({share:.1%}) were rescored with pi_{t-1}: their sampled ids are not the ids their "
                     "text renders to (special tokens dropped by decoding, a stop on EOS instead of the template's "
                     "end-of-turn token, or a non-canonical tokenization)")
            reuse = ({"policy_logps_reused": stats["responses"] - stats["policy_rescored"],
                      "policy_logps_rescored": stats["policy_rescored"]} if stats else {})
            return finish(a, reuse) if whole else _summary(output) | {"length_penalty": a} | reuse

    key = f"judge/{t}" if part is None else shard_key(f"judge/{t}", part)
    outputs = [output] + (diagnostics if whole else [])
    return run_stage(cfg, key, inputs, SECTIONS, outputs, body, extra_key={"iteration": t}, force=force, echo=echo)
