"""``spa sample --iteration t``: two responses per prompt of ``X_t`` from ``pi_{t-1}`` (docs/algorithm.md step 2).

T = 0.7, 300 new tokens, seeded; finish reasons and token counts recorded. Prompts are
processed in chunks (streamed to Parquet); ``--shard i/N`` does one chunk-aligned shard
and ``--merge N`` joins the shards into the same file an unsharded run writes. With
``sample.python`` set, the work runs in that interpreter (e.g. a vLLM environment).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spa.config import SPAConfig, load_config
from spa.errors import StageInputError
from spa.run.artifacts import atomic_path, iter_chunks, merge_parquet, num_rows, read_table
from spa.run.console import progress_bar, run_relayed
from spa.run.layout import RunLayout, model_dir
from spa.run.manifest import Stage
from spa.run.sharding import parse_shard, shard_bounds, shard_path
from spa.run.stage_runner import StageResult, require, run_stage
from spa.schemas import RESPONSES_WRITTEN

SECTIONS = ["model", "sample"]


def spec_from(cfg: SPAConfig):
    from spa.models.sampling import SamplingSpec

    return SamplingSpec.from_config(cfg.sample, cfg.model)


def sample_worker(cfg: SPAConfig, t: int, shard: tuple[int, int] | None = None) -> None:
    """Sample (a shard of) ``X_t`` with ``pi_{t-1}`` into ``responses.parquet`` (or its shard file)."""
    from spa.models.sampling import choose_backend, make_sampler

    layout = RunLayout.of(cfg)
    prompts_path = layout.prompts(t)
    start, stop = shard_bounds(num_rows(prompts_path), shard, cfg.sample.chunk_rows)
    out = layout.responses(t) if shard is None else shard_path(layout.responses(t), shard)
    policy = model_dir(cfg, t - 1)
    backend = choose_backend(cfg.sample.backend)
    sampler = make_sampler(backend, policy, spec_from(cfg))
    # a model inside the run directory is named relative to it, so a moved run keeps its artifacts' hashes
    model_id = str(policy.relative_to(layout.root)) if policy.is_relative_to(layout.root) else str(policy)
    bar = progress_bar(stop - start, f"sample iter {t}", "prompt")
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, RESPONSES_WRITTEN) as writer:
        for _, chunk in iter_chunks(prompts_path, "prompts", cfg.sample.chunk_rows, start, stop):
            samples = sampler(chunk.column("prompt").to_pylist())
            writer.write_table(pa.table({
                "prompt_id": chunk.column("prompt_id"),
                "prompt": chunk.column("prompt"),
                "responses": pa.array([s.responses for s in samples], pa.list_(pa.string())),
                "finish_reasons": pa.array([s.finish_reasons for s in samples], pa.list_(pa.string())),
                "num_tokens": pa.array([s.num_tokens for s in samples], pa.list_(pa.int32())),
                "model": pa.array([model_id] * len(samples), pa.string()),
                "backend": pa.array([backend] * len(samples), pa.string()),
                "token_ids": pa.array([s.token_ids for s in samples], pa.list_(pa.list_(pa.int32()))),
                "sampled_logps": pa.array([s.logps for s in samples], pa.list_(pa.float64()), from_pandas=True),
                "logp_dtype": pa.array([sampler.logp_dtype] * len(samples), pa.string()),
            }, schema=RESPONSES_WRITTEN))
            bar.update(chunk.num_rows)
    bar.close()


def _summary(path: Path) -> dict[str, Any]:
    table = read_table(path, "responses")
    reasons = [r for row in table.column("finish_reasons").to_pylist() for r in row]
    identical = sum(len(set(row)) < len(row) for row in table.column("responses").to_pylist())
    lengths = [n for row in table.column("num_tokens").to_pylist() for n in row]
    return {
        "prompts": table.num_rows, "responses": len(reasons),
        "truncated_share": round(reasons.count("length") / max(1, len(reasons)), 4),
        "prompts_with_identical_responses": identical,
        "mean_tokens": round(sum(lengths) / max(1, len(lengths)), 2),
        "backend": table.column("backend")[0].as_py() if table.num_rows else None,
    }


def _merge_shards(cfg: SPAConfig, t: int, merge: int) -> dict[str, Any]:
    final = RunLayout.of(cfg).responses(t)
    parts = [shard_path(final, (i, merge)) for i in range(merge)]
    for p in parts:
        require(p, "a sampling shard", f"spa sample --iteration {t} --shard i/{merge}")
    merge_parquet(parts, final, "responses")
    return _summary(final) | {"shards": merge}


def _sample(cfg: SPAConfig, t: int, shard: str | None) -> dict[str, Any]:
    """Sample (a shard of) ``X_t`` here, or in ``sample.python``'s interpreter when that is another one."""
    from spa.models.remote_sampling import same_interpreter

    layout = RunLayout.of(cfg)
    part = parse_shard(shard) if shard else None
    if same_interpreter(cfg.sample.python):
        sample_worker(cfg, t, part)
    else:
        cmd = [cfg.sample.python, "-m", "spa.stages.sample", "--config", str(layout.config), "--iteration", str(t)]
        run_relayed(cmd + (["--shard", shard] if shard else []))  # its logs routed like ours (spa.run.console)
    return _summary(layout.responses(t) if part is None else shard_path(layout.responses(t), part))


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print, shard: str | None = None,
        merge: int | None = None) -> StageResult:
    """Sample iteration ``t`` whole, one shard of it (``shard="i/N"``), or merge ``merge`` shards."""
    layout = RunLayout.of(cfg)
    if t > cfg.iterations and not layout.prompts(t).exists():  # prepare writes X_1..X_T only
        raise StageInputError(f"{layout.prompts(t)}: no prompt set for iteration {t}: the run has {cfg.iterations} "
                              f"iteration(s) configured (iterations), and `spa prepare` writes prompts for those only; "
                              "raise iterations (and data.prompt_sizes) and rerun it, or put a prompt batch in "
                              f"{layout.incoming} and run `spa expand` for more rounds")
    prompts = require(layout.prompts(t), f"prompt set X_{t}", "spa prepare")
    policy = require(model_dir(cfg, t - 1), f"pi_{t-1}", "spa seed" if t == 1 else f"spa train --iteration {t-1}")
    part = parse_shard(shard) if shard else None
    final = layout.responses(t)

    body = partial(_merge_shards, cfg, t, merge) if merge else partial(_sample, cfg, t, shard)
    key = Stage.SAMPLE.key(t, part)
    output = final if part is None else shard_path(final, part)
    return run_stage(cfg, key, [prompts, policy], SECTIONS, [output], body,
                     extra_key={"iteration": t}, force=force, echo=echo)


def _main() -> None:
    parser = argparse.ArgumentParser(description="SPA sampling worker (runs in the sampling environment)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--iteration", type=int, required=True)
    parser.add_argument("--shard", default=None)
    ns = parser.parse_args()
    sample_worker(load_config(ns.config), ns.iteration, parse_shard(ns.shard) if ns.shard else None)


if __name__ == "__main__":
    _main()
