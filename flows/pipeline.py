"""The SPA pipeline as a Prefect flow, reading like Algorithm 1 of the paper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import wait

from spa.config import load_config
from spa.run.preflight import preflight
from spa.run.runlock import RunLock
from spa_tasks import stage_tasks as stages


def sharded(step, merge, config: str, t: int, shards: int) -> dict[str, Any]:
    """Map a stage over ``shards`` chunk-aligned shards on the task runner, then merge them."""
    if shards <= 1:
        return step(config, t)
    futures = [step.submit(config, t, f"{i}/{shards}") for i in range(shards)]
    wait(futures)
    for f in futures:
        f.result()  # raise the first shard failure
    return merge(config, t, shards)


@flow(name="spa-pipeline", log_prints=True)
def spa_pipeline(config: str, shards: int = 1) -> str:
    """prepare -> seed -> for t in 1..T: sample -> judge -> train -> evaluate -> report."""
    cfg = load_config(config)
    preflight(cfg, config)  # missing model folders or data: one error before any task starts (never retried)
    with RunLock(cfg.run_dir, "spa-pipeline"):
        stages.prepare(config)
        if not cfg.model.pi_0:  # no-seed mode: pi_0 is given
            stages.seed(config)
            stages.evaluate(config, 0)
        for t in range(1, cfg.iterations + 1):
            sharded(stages.sample, stages.merge_samples, config, t, shards)  # y1, y2 ~ pi_{t-1}
            sharded(stages.judge, stages.merge_judgments, config, t, shards)  # Eq. 7-8
            stages.train(config, t)  # Eq. 9-12
            stages.evaluate(config, t)
        return stages.report(config)


def pipeline_with_runner(ray_address: str | None = None):
    """The pipeline flow, on Prefect's thread pool or (with ``ray_address``) on a Ray cluster."""
    if not ray_address:
        return spa_pipeline
    from prefect_ray import RayTaskRunner

    return spa_pipeline.with_options(task_runner=RayTaskRunner(address=None if ray_address == "local" else ray_address))


def main(config: str) -> str:
    return spa_pipeline(config=str(Path(config).resolve()))
