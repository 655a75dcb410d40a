"""The SPA pipeline as a Prefect flow, reading like Algorithm 1 of the paper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.futures import wait

from spa.config import load_config, save_resolved
from spa.run.preflight import preflight
from spa.run.runlock import RunLock
from spa_tasks import stage_tasks as stages
from spa_tasks.artifacts import Progress


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
    """prepare -> seed -> for t in 1..T: sample -> judge -> train -> evaluate -> report.

    Results as Prefect artifacts (``spa_tasks.artifacts``): metrics after each evaluate, the report, progress."""
    cfg = load_config(config)  # hub ids resolve here, once (spa/models/hub.py)
    preflight(cfg, config)  # missing model folders or data: one error before any task starts (never retried)
    with RunLock(cfg.run_dir, "spa-pipeline"):
        # every stage reads the resolved config: a hub branch that moves during the run changes nothing
        config = str(save_resolved(cfg))
        progress = Progress(cfg.run_dir, total=2 + 2 * (not cfg.model.pi_0) + 4 * cfg.iterations)
        stages.prepare(config)
        progress.step("prepare")
        if not cfg.model.pi_0:  # no-seed mode: pi_0 is given
            stages.seed(config)
            progress.step("seed")
            stages.evaluate(config, 0)
            progress.step("evaluate t=0")
        for t in range(1, cfg.iterations + 1):
            sharded(stages.sample, stages.merge_samples, config, t, shards)  # y1, y2 ~ pi_{t-1}
            progress.step(f"sample t={t}")
            sharded(stages.judge, stages.merge_judgments, config, t, shards)  # Eq. 7-8
            progress.step(f"judge t={t}")
            stages.train(config, t)  # Eq. 9-12
            progress.step(f"train t={t}")
            stages.evaluate(config, t)
            progress.step(f"evaluate t={t}")
        report = stages.report(config)
        progress.step("report")
        return report


def pipeline_with_runner(ray_address: str | None = None):
    """The pipeline flow, on Prefect's thread pool or (with ``ray_address``) on a Ray cluster."""
    if not ray_address:
        return spa_pipeline
    from prefect_ray import RayTaskRunner

    return spa_pipeline.with_options(task_runner=RayTaskRunner(address=None if ray_address == "local" else ray_address))


def main(config: str) -> str:
    return spa_pipeline(config=str(Path(config).resolve()))
