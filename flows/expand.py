"""``expand``: one more SPA iteration per new prompt batch, from the newest model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow

from spa.config import load_config
from spa.data.expansion import incoming_batches, mark_done, plan_batch
from spa.run.console import say
from spa.run.layout import RunLayout, save_resolved
from spa.run.runlock import RunLock
from spa_flows.steps import Steps, iteration
from spa_tasks.interrupts import watching_flow_run


@flow(name="spa-expand", log_prints=True)
def expand(config: str, incoming: str | None = None, shards: int = 1,
           overrides: dict[str, Any] | None = None) -> list[dict]:
    """For each unused batch in ``incoming`` (default ``<run_dir>/incoming``): one round of the pipeline (sample ->
    judge -> train -> evaluate, sample and judge over ``shards``), then the report. ``overrides``: dotted config
    keys over the file's values."""
    cfg = load_config(config, overrides)
    layout = RunLayout.of(cfg)
    folder = Path(incoming) if incoming else layout.incoming
    done = []
    with RunLock(cfg.run_dir, "spa-expand"), watching_flow_run():  # Ctrl-C: spa_tasks/interrupts.py
        config = str(save_resolved(cfg))  # hub ids resolved once: every stage reads the same snapshot
        steps = Steps(config, shards)
        for batch in incoming_batches(folder):
            plan = plan_batch(cfg, batch)
            if plan is None:
                continue
            say(f"[expand] {plan.batch}: {plan.new_prompts} new prompts, {plan.overlap} already used (dropped), "
                f"{plan.duplicates} duplicates -> iteration {plan.iteration}")
            if plan.new_prompts:
                iteration(steps, plan.iteration)
            mark_done(layout, plan)
            done.append(asdict(plan))
        if done:
            steps.report()
    if not done:
        say(f"[expand] no new prompt batches in {folder}")
    return done
