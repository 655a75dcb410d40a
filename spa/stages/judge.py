"""``spa judge --iteration t``: label each response pair with the implicit reward (Eq. 7, 8, 13).

Variants (docs/variants.md 5-6): best-vs-worst of ``n`` samples with a fixed or automatic length
penalty (DICE), an external reward model or an LLM judge instead of the implicit reward, and
label-noise injection (``judge.flip_fraction``).

``p = sigma(r(y1) - r(y2))`` with ``r(y) = beta*[log pi_{t-1}(y|x) - log pi_ref(y|x)]``,
``pi_ref = pi_init`` by default (or the previous model, or none). Streams through the
responses in batches: memory does not grow with the number of prompts.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spa.config import SPAConfig
from spa.judges.labels import label_rows
from spa.judges.scoring import Judges, Scores, reference_dir
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
from spa.run.stage_runner import StageResult, require, run_stage
from spa.schemas import JUDGMENTS, JUDGMENTS_WRITTEN, ORACLE_VERDICTS

SECTIONS = ["model", "judge"]



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


def write_judge_summary(cfg: SPAConfig, t: int, length_penalty: float, echo) -> dict[str, Any]:
    """Write ``judge_summary.json`` of the whole set (numbers of the judgments alone: a merged set and the same set
    judged at once write the same bytes), with the oracle's diagnostics where one is configured."""
    layout = RunLayout.of(cfg)
    final = layout.judgments(t)
    summary = _summary(final) | {"length_penalty": length_penalty}
    if cfg.judge.oracle:
        summary |= oracle_summary(cfg, final, layout.oracle_verdicts(t))
    write_text_atomic(layout.judge_summary(t), json.dumps(summary, indent=2))
    if cfg.train.report_to:  # the same numbers into iteration t's experiment-tracker run
        from spa.run.trackers import log_summary

        log_summary(cfg.train.report_to, cfg.run_dir, t, "judge", summary, echo)
    return summary


def _merge_shards(cfg: SPAConfig, t: int, merge: int, echo) -> dict[str, Any]:
    final = RunLayout.of(cfg).judgments(t)
    parts = [shard_path(final, (i, merge)) for i in range(merge)]
    for p in parts:
        require(p, "a judge shard", f"spa judge --iteration {t} --shard i/{merge}")
    merge_parquet(parts, final, "judgments")
    # 'auto' is refused when sharded: the configured penalty is the one every shard used
    return write_judge_summary(cfg, t, float(cfg.judge.length_penalty), echo) | {"shards": merge}


def _judge(cfg: SPAConfig, t: int, responses: Path, output: Path, part, echo) -> tuple[float, dict[str, int]]:
    """Judge (a shard of) the responses into ``output``; the penalty used and how the policy log-probs were got."""
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
    return a, reuse


def _judge_whole(cfg: SPAConfig, t: int, responses: Path, output: Path, part, echo) -> dict[str, Any]:
    a, reuse = _judge(cfg, t, responses, output, part, echo)
    return write_judge_summary(cfg, t, a, echo) | reuse


def _judge_shard(cfg: SPAConfig, t: int, responses: Path, output: Path, part, echo) -> dict[str, Any]:
    a, reuse = _judge(cfg, t, responses, output, part, echo)
    return _summary(output) | {"length_penalty": a} | reuse


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

    if merge:
        body = partial(_merge_shards, cfg, t, merge, echo)
    else:
        body = partial(_judge_whole if whole else _judge_shard, cfg, t, responses, output, part, echo)
    key = Stage.JUDGE.key(t, part)
    outputs = [output] + (diagnostics if whole else [])
    return run_stage(cfg, key, inputs, SECTIONS, outputs, body, extra_key={"iteration": t}, force=force, echo=echo)
