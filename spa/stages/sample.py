"""``spa sample --iteration t``: two responses per prompt of ``X_t`` from ``pi_{t-1}`` (SPA.md step 2).

T = 0.7, 300 new tokens, seeded; finish reasons and token counts recorded. With
``sample.python`` set, the work runs in that interpreter (e.g. a vLLM environment).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa

from spa.artifacts import read_table, write_table
from spa.config import SPAConfig, load_config
from spa.layout import RunLayout
from spa.sampling import SamplingSpec, choose_backend, sample_transformers, sample_vllm
from spa.stages.runner import StageResult, require, run_stage
from spa.stages.train import model_dir

SECTIONS = ["model", "sample"]


def spec_from(cfg: SPAConfig) -> SamplingSpec:
    s = cfg.sample
    return SamplingSpec(
        n=s.n, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed,
        batch_size=s.batch_size, max_length=cfg.model.max_length, gpu_memory_utilization=s.gpu_memory_utilization,
        dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
    )


def sample_worker(cfg: SPAConfig, t: int) -> None:
    """Sample ``X_t`` with ``pi_{t-1}`` and write ``iter_t/responses.parquet`` (in this process)."""
    layout = RunLayout(Path(cfg.run_dir))
    prompts = read_table(layout.prompts(t), "prompts")
    policy = model_dir(cfg, t - 1)
    backend = choose_backend(cfg.sample.backend)
    fn = sample_vllm if backend == "vllm" else sample_transformers
    samples = fn(policy, prompts.column("prompt").to_pylist(), spec_from(cfg), progress=f"sample iter {t}")
    table = pa.table({
        "prompt_id": prompts.column("prompt_id"),
        "prompt": prompts.column("prompt"),
        "responses": pa.array([s.responses for s in samples], pa.list_(pa.string())),
        "finish_reasons": pa.array([s.finish_reasons for s in samples], pa.list_(pa.string())),
        "num_tokens": pa.array([s.num_tokens for s in samples], pa.list_(pa.int32())),
        "model": pa.array([str(policy)] * len(samples), pa.string()),
        "backend": pa.array([backend] * len(samples), pa.string()),
    })
    write_table(table, layout.responses(t), "responses")


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print) -> StageResult:
    layout = RunLayout(Path(cfg.run_dir))
    prompts = require(layout.prompts(t), f"prompt set X_{t}", "spa prepare")
    policy = require(model_dir(cfg, t - 1), f"pi_{t-1}", "spa seed" if t == 1 else f"spa train --iteration {t-1}")

    def body() -> dict[str, Any]:
        # compare unresolved paths: venv interpreters are symlinks to one base Python
        if cfg.sample.python and os.path.abspath(cfg.sample.python) != os.path.abspath(sys.executable):
            subprocess.run([cfg.sample.python, "-m", "spa.stages.sample", "--config", str(layout.config),
                            "--iteration", str(t)], check=True)
        else:
            sample_worker(cfg, t)
        table = read_table(layout.responses(t), "responses")
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

    return run_stage(cfg, f"sample/{t}", [prompts, policy], SECTIONS, [layout.responses(t)], body,
                     extra_key={"iteration": t}, force=force, echo=echo)


def _main() -> None:
    parser = argparse.ArgumentParser(description="SPA sampling worker (runs in the sampling environment)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--iteration", type=int, required=True)
    ns = parser.parse_args()
    sample_worker(load_config(ns.config), ns.iteration)


if __name__ == "__main__":
    _main()
