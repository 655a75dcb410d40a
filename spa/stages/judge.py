"""``spa judge --iteration t``: label each response pair with the implicit reward (Eq. 7, 8, 13).

Variants (docs/variants.md 5-6): best-vs-worst of ``n`` samples with a fixed or automatic length
penalty (DICE), an external reward model or an LLM judge instead of the implicit reward, and
label-noise injection (``judge.flip_fraction``).

``p = sigma(r(y1) - r(y2))`` with ``r(y) = beta*[log pi_{t-1}(y|x) - log pi_ref(y|x)]``,
``pi_ref = pi_init`` by default (or the previous model, or none). Streams through the
responses in batches: memory does not grow with the number of prompts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spa.config import SPAConfig
from spa.run.artifacts import (
    atomic_path,
    conform,
    iter_chunks,
    merge_parquet,
    num_rows,
    write_table,
    write_text_atomic,
)
from spa.run.console import progress_bar
from spa.run.layout import RunLayout, model_dir
from spa.run.manifest import Stage
from spa.run.sharding import parse_shard, shard_bounds, shard_path
from spa.schemas import JUDGMENTS, JUDGMENTS_WRITTEN, ORACLE_VERDICTS
from spa.stages.judge_scoring import Judges, Scores, reference_dir
from spa.stages.runner import StageResult, require, run_stage

SECTIONS = ["model", "judge"]



def judge_name(cfg: SPAConfig, length_penalty: float | None = None) -> str:
    j = cfg.judge
    a = j.length_penalty if length_penalty is None else length_penalty
    a_text = f"{a:.6g}" if isinstance(a, float | int) else str(a)
    if j.type == "implicit":
        reuse = ",policy_logps=from_sampling" if j.policy_logps == "from_sampling" else ""
        base = f"implicit(ref={j.reference},beta={j.beta},length_penalty={a_text}{reuse})"
    elif j.type == "external_rm":
        base = f"external_rm({Path(j.reward_model or '').name},length_penalty={a_text})"
    elif j.type == "verifier":
        base = f"verifier({Path(j.instructions or '').name})"
    else:
        base = f"llm_judge({Path(j.llm_judge_model or cfg.model.pi_init).name},both_orders)"
    if j.select == "best_worst":
        base += f"+best_worst(n={cfg.sample.n})"
    if j.flip_fraction:
        base += f"+flip({j.flip_fraction})"
    return base


def flip_mask(prompt_ids: list[str], fraction: float, seed: int, t: int) -> np.ndarray:
    """Label-noise injection: each prompt's label flips with probability ``fraction``, decided by a
    hash of (seed, iteration, prompt id) so that shards and reruns flip the same rows."""
    if fraction <= 0:
        return np.zeros(len(prompt_ids), dtype=bool)
    u = [int.from_bytes(hashlib.sha256(f"{seed}\0{t}\0{pid}".encode()).digest()[:8], "little") / 2**64
         for pid in prompt_ids]
    return np.array(u) < fraction


def pick_pairs(scores: Scores, cands: list[list[str]], cfg: SPAConfig, prompt_ids: list[str], t: int,
               length_penalty: float) -> tuple[np.ndarray, ...]:
    """Which candidate is chosen and which rejected per row (Eq. 8, or best-vs-worst), ``p_chosen`` (Eq. 7
    with Eq. 13's penalty), ties, and the injected flips: ``(ci, ri, p_chosen, tie, flipped)``."""
    import torch

    from spa.judges.implicit_reward import assign_labels, length_penalised, preference, select_pairs

    reward, lens = torch.from_numpy(scores.reward), torch.from_numpy(scores.lens)
    score = length_penalised(reward, lens, length_penalty)  # Eq. 13 on Eq. 4's rewards
    rows_idx = torch.arange(len(cands))
    if cfg.judge.select == "best_worst":
        ci, ri = (x.numpy() for x in select_pairs(reward, lens, length_penalty))
        tie = ci == ri
    else:
        p1 = scores.p_first if scores.p_first is not None else preference(score[:, 0], score[:, 1]).numpy()  # Eq. 7
        first, tie = (x.numpy() for x in assign_labels(torch.from_numpy(p1)))  # Eq. 8; a tie keeps y1 first
        ci = np.where(first | tie, 0, 1)
        ri = 1 - ci
    if scores.p_first is not None:  # a pairwise judge (LLM judge): its own p(y1 > y2)
        p_chosen = np.where(ci == 0, scores.p_first, 1.0 - scores.p_first)
    else:  # Eq. 7 for (chosen, rejected); the verifier's preference is certain
        p_chosen = preference(score[rows_idx, ci], score[rows_idx, ri]).numpy()
        p_chosen = np.where(p_chosen > 0.5, 1.0, 0.5) if scores.decisive else p_chosen
    identical = np.array([c[i] == c[j] for c, i, j in zip(cands, ci, ri, strict=True)]) | np.array(
        [i == j for i, j in zip(ci, ri, strict=True)])
    tie = tie | identical  # identical texts are a tie even if padding nudged the numbers
    p_chosen = np.where(tie, 0.5, p_chosen)
    ri = np.where(tie & (ci == ri), (ci + 1) % len(cands[0]), ri)  # a tie row still names two responses
    flipped = flip_mask(prompt_ids, cfg.judge.flip_fraction, cfg.sample.seed, t) & ~tie
    ci, ri = np.where(flipped, ri, ci), np.where(flipped, ci, ri)
    p_chosen = np.where(flipped, 1.0 - p_chosen, p_chosen)
    return ci, ri, p_chosen, tie, flipped


def label_rows(rows: pa.Table, scores: Scores, cands: list[list[str]], fins: list[list[bool]], cfg: SPAConfig,
               t: int, length_penalty: float) -> pa.Table:
    """Eq. 7-8 (or best-vs-worst selection) on scored candidates -> judgments rows."""
    n = len(cands)
    ci, ri, p_chosen, tie, flipped = pick_pairs(scores, cands, cfg, rows.column("prompt_id").to_pylist(), t,
                                                length_penalty)
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
        "judge": pa.array([judge_name(cfg, length_penalty)] * n, pa.string()),
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
        with progress_bar(stop - start, f"judge iter {t} (scoring)", "prompt", progress) as bar:
            for first, rows in chunks():
                stored.append(judges.score(*judges.inputs(rows, str(responses), first)))
                bar.update(rows.num_rows)
        if stored:
            a = auto_length_penalty(torch.from_numpy(np.concatenate([s.reward for s in stored])),
                                    torch.from_numpy(np.concatenate([s.lens for s in stored]).astype(np.float64)),
                                    signed=cfg.judge.length_penalty_sign == "signed")
    bar = progress_bar(stop - start, f"judge iter {t}", "prompt", progress)
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, JUDGMENTS_WRITTEN) as writer:
            for k, (first, rows) in enumerate(chunks()):
                prompts, cands, fins, sampled = judges.inputs(rows, str(responses), first)
                scores = stored[k] if auto else judges.score(prompts, cands, fins, sampled)
                table = conform(label_rows(rows, scores, cands, fins, cfg, t, a), JUDGMENTS, str(out), first)
                writer.write_table(table.cast(JUDGMENTS_WRITTEN))
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
    from spa.judges.verifier import VerifierOracle

    table = pq.read_table(judgments, columns=["prompt_id", "prompt", "chosen", "rejected", "tie",
                                              "chosen_tokens", "rejected_tokens"])
    table = table.filter(pc.invert(table.column("tie")))
    oracle = load_annotator(cfg.judge.oracle) if cfg.judge.oracle != "verifier" else VerifierOracle(cfg.judge.instructions)
    verdicts = annotate(oracle, table.column("prompt").to_pylist(),
                        table.column("chosen").to_pylist(), table.column("rejected").to_pylist())
    write_table(pa.table({"prompt_id": table.column("prompt_id"), "oracle_verdict": pa.array(verdicts, pa.float64())},
                         schema=ORACLE_VERDICTS.schema),
                out)
    return oracle_label_quality(verdicts, table.column("chosen_tokens").to_numpy(),
                                table.column("rejected_tokens").to_numpy())


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print, shard: str | None = None,
        merge: int | None = None) -> StageResult:
    """Judge iteration ``t`` whole, one shard of it (``shard="i/N"``), or merge ``merge`` shards."""
    layout = RunLayout.of(cfg)
    responses = require(layout.responses(t), "responses", f"spa sample --iteration {t}")
    policy = require(model_dir(cfg, t - 1), f"pi_{t-1}", "spa seed" if t == 1 else f"spa train --iteration {t-1}")
    ref = reference_dir(cfg, t)
    inputs = [responses, policy] + ([require(ref, "the judge's reference model", "spa seed / spa train")] if ref else [])
    if cfg.judge.instructions:  # the verifier's constraints: a changed task file relabels
        inputs.append(Path(cfg.judge.instructions))
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
        if cfg.train.report_to:  # the same numbers into iteration t's experiment-tracker run
            from spa.run.trackers import log_summary

            log_summary(cfg.train.report_to, cfg.run_dir, t, "judge", summary, echo)
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

    key = Stage.JUDGE.key(t, part)
    outputs = [output] + (diagnostics if whole else [])
    return run_stage(cfg, key, inputs, SECTIONS, outputs, body, extra_key={"iteration": t}, force=force, echo=echo)
