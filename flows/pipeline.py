"""The SPA pipeline as a Prefect flow, reading like Algorithm 1 of the paper."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from spa.config import load_config
from spa.run.layout import save_resolved
from spa.run.preflight import preflight
from spa.run.runlock import RunLock
from spa_flows.steps import Steps, iteration
from spa_tasks.artifacts import Progress
from spa_tasks.interrupts import watching_flow_run


@flow(name="spa-pipeline", log_prints=True)
def spa_pipeline(config: str, shards: int = 1, overrides: dict[str, Any] | None = None) -> str:
    """prepare -> seed -> evaluate pi_0 -> for t in 1..T: sample -> judge -> train -> evaluate -> report.

    ``overrides``: dotted config keys (``train.beta``) over the file's values. Results as Prefect artifacts
    (``spa_tasks.artifacts``): metrics after each evaluate, the report, progress."""
    cfg = load_config(config, overrides)  # hub ids resolve here, once (spa/config/hub.py)
    preflight(cfg, config)  # missing model folders or data: one error before any task starts (never retried)
    with RunLock(cfg.run_dir, "spa-pipeline"), watching_flow_run():  # Ctrl-C: spa_tasks/interrupts.py
        # every stage reads the resolved config: a hub branch that moves during the run changes nothing
        config = str(save_resolved(cfg))
        seeded = not cfg.model.pi_0  # no-seed mode: pi_0 is given
        steps = Steps(config, shards, Progress(cfg.run_dir, total=2 + 2 * seeded + 4 * cfg.iterations))
        steps.prepare()
        if seeded:
            steps.seed()  # pi_0 = DPO(pi_init, D_0)
            steps.evaluate(0)
        for t in range(1, cfg.iterations + 1):
            iteration(steps, t)
        return steps.report()


def pipeline_with_runner(ray_address: str | None = None):
    """The pipeline flow, on Prefect's thread pool or (with ``ray_address``) on a Ray cluster."""
    if not ray_address:
        return spa_pipeline
    from prefect_ray import RayTaskRunner

    return spa_pipeline.with_options(task_runner=RayTaskRunner(address=None if ray_address == "local" else ray_address))


def main(config: str) -> str:
    return spa_pipeline(config=str(Path(config).resolve()))
