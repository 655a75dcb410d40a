"""``spa judge --iteration t``: label each response pair with the implicit reward (Eq. 7, 8, 13).

``p = sigma(r(y1) - r(y2))`` with ``r(y) = beta*[log pi_{t-1}(y|x) - log pi_ref(y|x)]``,
``pi_ref = pi_init`` by default (or the previous model, or none). Streams through the
responses in batches: memory does not grow with the number of prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spa.artifacts import atomic_path, conform, iter_chunks, merge_parquet, num_rows, read_table
from spa.config import SPAConfig
from spa.layout import RunLayout, model_dir
from spa.schemas import JUDGMENTS
from spa.sharding import parse_shard, shard_bounds, shard_key, shard_path
from spa.stages.runner import StageResult, require, run_stage

SECTIONS = ["model", "judge"]

JUDGMENT_SCHEMA = pa.schema(list(JUDGMENTS.schema) + [
    pa.field("chosen_finished", pa.bool_()), pa.field("rejected_finished", pa.bool_()),
    pa.field("chosen_tokens", pa.int32()), pa.field("rejected_tokens", pa.int32()),
    pa.field("first_is_chosen", pa.bool_()), pa.field("dropped", pa.bool_()),
])


def reference_dir(cfg: SPAConfig, t: int) -> Path | None:
    """The judge's reference: pi_init (paper), pi_{t-1}'s predecessor, or none."""
    if cfg.judge.reference == "none":
        return None
    if cfg.judge.reference == "previous" and t >= 2:
        return model_dir(cfg, t - 2)
    return Path(cfg.model.pi_init)


def judge_name(cfg: SPAConfig) -> str:
    j = cfg.judge
    return f"implicit(ref={j.reference},beta={j.beta},length_penalty={j.length_penalty})"


def judge_rows(rows: pa.Table, policy, ref, tok, cfg: SPAConfig) -> pa.Table:
    """Judge one chunk of ``responses.parquet`` rows (the first two responses of each prompt)."""
    import torch

    from spa.judge import implicit_preference
    from spa.logprobs import sequence_logps

    prompts = rows.column("prompt").to_pylist()
    responses = rows.column("responses").to_pylist()
    reasons = rows.column("finish_reasons").to_pylist()
    for i, r in enumerate(responses):
        if len(r) < 2:
            raise ValueError(f"responses row {i}: {len(r)} responses; judging needs 2 per prompt")
    y1, y2 = [r[0] for r in responses], [r[1] for r in responses]
    f1, f2 = [x[0] == "stop" for x in reasons], [x[1] == "stop" for x in reasons]
    bs, ml = cfg.judge.batch_size, cfg.model.max_length
    both_p = prompts + prompts
    both_y, both_f = y1 + y2, f1 + f2
    pol, lens = sequence_logps(policy, tok, both_p, both_y, both_f, bs, ml)
    if ref is not None:
        ref_lp, _ = sequence_logps(ref, tok, both_p, both_y, both_f, bs, ml)
    else:
        ref_lp = np.full_like(pol, np.nan)
    n = len(prompts)
    p1 = implicit_preference(
        torch.from_numpy(pol[:n]), torch.from_numpy(ref_lp[:n]) if ref is not None else None,
        torch.from_numpy(pol[n:]), torch.from_numpy(ref_lp[n:]) if ref is not None else None,
        cfg.judge.beta, cfg.judge.length_penalty, torch.from_numpy(lens[:n]), torch.from_numpy(lens[n:]),
    ).numpy()
    identical = np.array([a == b for a, b in zip(y1, y2, strict=True)])
    p1 = np.where(identical, 0.5, p1)  # identical texts are a tie even if padding nudged the numbers
    tie = p1 == 0.5
    first = p1 > 0.5  # Eq. 8; on a tie y1 stays first and the row is kept out of training
    pick = lambda a, b: np.where(first | tie, a, b)  # noqa: E731
    truncated = ~(np.array(f1) & np.array(f2))
    return pa.table({
        "prompt_id": rows.column("prompt_id"),
        "prompt": rows.column("prompt"),
        "chosen": pa.array(pick(np.array(y1, dtype=object), np.array(y2, dtype=object)).tolist(), pa.string()),
        "rejected": pa.array(pick(np.array(y2, dtype=object), np.array(y1, dtype=object)).tolist(), pa.string()),
        "p_chosen": pa.array(np.where(first | tie, p1, 1.0 - p1), pa.float64()),
        "policy_logp_chosen": pa.array(pick(pol[:n], pol[n:]), pa.float64()),
        "policy_logp_rejected": pa.array(pick(pol[n:], pol[:n]), pa.float64()),
        "ref_logp_chosen": pa.array(pick(ref_lp[:n], ref_lp[n:]), pa.float64(), from_pandas=True),
        "ref_logp_rejected": pa.array(pick(ref_lp[n:], ref_lp[:n]), pa.float64(), from_pandas=True),
        "tie": pa.array(tie),
        "judge": pa.array([judge_name(cfg)] * n, pa.string()),
        "chosen_finished": pa.array(pick(np.array(f1), np.array(f2))),
        "rejected_finished": pa.array(pick(np.array(f2), np.array(f1))),
        "chosen_tokens": pa.array(pick(lens[:n], lens[n:]), pa.int32()),
        "rejected_tokens": pa.array(pick(lens[n:], lens[:n]), pa.int32()),
        "first_is_chosen": pa.array(first | tie),
        "dropped": pa.array(truncated & cfg.judge.drop_truncated),
    })


def judge_file(cfg: SPAConfig, t: int, responses: Path, out: Path, shard: tuple[int, int] | None = None,
               progress: bool = True) -> None:
    """Stream (a chunk-aligned shard of) ``responses`` through the judge into ``out`` (atomic)."""
    from tqdm.auto import tqdm

    from spa.models import load_causal_lm
    from spa.rendering import load_tokenizer

    start, stop = shard_bounds(num_rows(responses), shard, cfg.judge.chunk_rows)
    dtype, trc = cfg.model.dtype, cfg.model.trust_remote_code
    policy_dir = model_dir(cfg, t - 1)
    tok = load_tokenizer(policy_dir, trc)
    policy = load_causal_lm(policy_dir, dtype, trust_remote_code=trc)
    ref_dir = reference_dir(cfg, t)
    ref = load_causal_lm(ref_dir, dtype, trust_remote_code=trc) if ref_dir is not None else None
    bar = tqdm(total=stop - start, desc=f"judge iter {t}", unit="prompt", disable=not progress)
    with atomic_path(out) as tmp:
        with pq.ParquetWriter(tmp, JUDGMENT_SCHEMA) as writer:
            for first, rows in iter_chunks(responses, "responses", cfg.judge.chunk_rows, start, stop):
                table = conform(judge_rows(rows, policy, ref, tok, cfg), JUDGMENTS, str(out), first)
                writer.write_table(table.cast(JUDGMENT_SCHEMA))
                bar.update(table.num_rows)
    bar.close()


def _summary(path: Path) -> dict[str, Any]:
    table = read_table(path, "judgments")
    finished = zip(table.column("chosen_finished").to_pylist(), table.column("rejected_finished").to_pylist(), strict=True)
    p = table.column("p_chosen").to_numpy()
    return {
        "pairs": table.num_rows,
        "ties": int(np.sum(table.column("tie").to_numpy())),
        "truncated_pairs": sum(not (a and b) for a, b in finished),
        "dropped": int(np.sum(table.column("dropped").to_numpy())),
        "mean_p_chosen": round(float(np.mean(p)), 4) if table.num_rows else None,
    }


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

    if merge:
        parts = [shard_path(final, (i, merge)) for i in range(merge)]

        def body() -> dict[str, Any]:
            for p in parts:
                require(p, "a judge shard", f"spa judge --iteration {t} --shard i/{merge}")
            merge_parquet(parts, final, "judgments")
            return _summary(final) | {"shards": merge}
    else:
        def body() -> dict[str, Any]:
            judge_file(cfg, t, responses, output, part)
            return _summary(output)

    key = f"judge/{t}" if part is None else shard_key(f"judge/{t}", part)
    return run_stage(cfg, key, inputs, SECTIONS, [output], body, extra_key={"iteration": t}, force=force, echo=echo)
