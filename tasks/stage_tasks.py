"""Prefect tasks, one per stage: each runs the stage's ``spa`` command in its own process.

A separate process per stage returns GPU memory between stages (vllm#1908) and lets a
stage run under torchrun. Task results are small manifests (artifact paths and content
hashes from ``manifest.json``), never data. Resume is the stage's own content-hash check,
not Prefect's cache (prefect#12229). Retries only for failures worth retrying: exit code 2
is bad input and fails at once. Task runs are named by stage and iteration (``train t=2``); evaluate
and report publish the run's results as Prefect artifacts (``spa_tasks.artifacts``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from spa.run.console import FLOW_STAGE_ENV, PROGRESS_RELAY_ENV, RelayedBar
from spa.run.manifest import Stage
from spa.run.sharding import parse_shard, shard_devices, visible_devices
from spa_tasks import artifacts, interrupts
from spa_tasks.run_config import run_config


class BadStageInput(RuntimeError):
    """The stage rejected its input (exit code 2): retrying cannot help."""


class StageFailed(RuntimeError):
    """The stage process failed or was killed: worth a retry."""


def _worth_retrying(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's signature
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # noqa: BLE001
        exc = err
    return not isinstance(exc, BadStageInput)


def stage_command(stage: str, config: str, iteration: int | None = None, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "spa_tasks.stage_cli", stage, "-c", str(config)]
    if iteration is not None:
        cmd += ["-t", str(iteration)]
    return cmd + list(extra)


def run_inline(cmd: list[str]) -> None:
    """Run a stage command in this process (no interpreter start, no second import of torch/transformers:
    bench P5). GPU memory is not handed back between stages, so this is for CPU and small runs."""
    import contextlib
    import io
    from unittest.mock import patch

    import click
    import typer

    from spa_tasks.stage_cli import app

    class Tee(io.TextIOBase):
        """stderr passed through, its last lines kept for the task's error message."""

        def __init__(self, target):
            self.target, self.text = target, ""

        def write(self, s: str) -> int:
            self.text = (self.text + s)[-4000:]
            return self.target.write(s)

        def flush(self) -> None:
            self.target.flush()

    get_run_logger().info("$ %s (in the flow's process)", " ".join(cmd[3:]))
    tee = Tee(sys.stderr)
    # the flow routes the output (a worker's Prefect log, or spa run's terminal); patch.dict puts os.environ back
    with contextlib.redirect_stderr(tee), patch.dict(os.environ, {FLOW_STAGE_ENV: "1"}):
        try:  # click returns the exit code of typer.Exit in non-standalone mode (older versions raise it)
            rc = typer.main.get_command(app).main(args=cmd[3:], prog_name="spa", standalone_mode=False)
        except click.exceptions.Exit as exc:
            rc = exc.exit_code
    rc = rc if isinstance(rc, int) else 0
    tail = "\n".join(line for line in tee.text.splitlines() if line.strip() and "\r" not in line)
    if rc == 2:
        raise BadStageInput("\n".join(tail.splitlines()[-5:]))
    if rc:
        raise StageFailed(f"spa {' '.join(cmd[3:])} exited with {rc}:\n" + "\n".join(tail.splitlines()[-10:]))


def shard_env(shard: str | None, group_size: int, env: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment of shard ``i/N`` when the shards run side by side on this machine: ``CUDA_VISIBLE_DEVICES``
    narrowed to the shard's own ``group_size`` GPUs of those visible (``spa.run.sharding.shard_devices``; never
    wider than a ``CUDA_VISIBLE_DEVICES`` already set). ``None`` (inherit this process's) without a shard or GPUs."""
    env = dict(os.environ if env is None else env)
    visible = visible_devices(env) if shard else []
    if not visible:
        return None
    i, n = parse_shard(shard)
    try:
        env["CUDA_VISIBLE_DEVICES"] = shard_devices(i, group_size, visible)
    except ValueError as exc:
        raise BadStageInput(str(exc)) from None
    if n * group_size > len(visible) and i == 0:
        import logging

        try:
            logger = get_run_logger()
        except Exception:  # noqa: BLE001 - outside a Prefect run
            logger = logging.getLogger(__name__)
        logger.warning("%d shards x %d GPUs each > %d visible GPUs: shards share GPUs (lower "
                       "sample.gpu_memory_utilization or --shards)", n, group_size, len(visible))
    return env


def run_command(cmd: list[str], config: str, env: dict[str, str] | None = None) -> None:
    """Run a stage command of the run ``config``: as a process, streaming its output into the Prefect log, or in
    this process (``run_inline``, which ignores ``env``) when the config says ``stage_processes: inline``; ``env``
    replaces this process's environment for the process."""
    with interrupts.running(_running_name(cmd)):
        if run_config(config).stage_processes == "inline":
            run_inline(cmd)
        else:
            run_process(cmd, env)


def _running_name(cmd: list[str]) -> str:
    """The task run's name (``train t=2``), or the stage's outside a task run."""
    from prefect.runtime import task_run

    return task_run.name or cmd[3]


def run_process(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a stage command as its own process, streaming its output into the Prefect log."""
    logger = get_run_logger()
    logger.info("$ %s%s", " ".join(cmd[1:]), f" (CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']})" if env else "")
    # its whole output comes here, as before; its progress bar as state lines, drawn here (one bar, on a TTY)
    env = {**(os.environ if env is None else env), FLOW_STAGE_ENV: "1", PROGRESS_RELAY_ENV: "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    tail: list[str] = []
    bar = RelayedBar()
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if bar.feed(line):
                continue
            if line and "\r" not in line:  # progress-bar redraws stay out of the log
                logger.info(line)
            tail = (tail + [line])[-20:]
    finally:
        bar.close()
    rc = proc.wait()
    if rc == 2:
        raise BadStageInput("\n".join(tail[-5:]))
    if rc != 0:
        raise StageFailed(f"{' '.join(cmd[1:])} exited with {rc}:\n" + "\n".join(tail[-10:]))


def stage_record(config: str, key: str) -> dict[str, Any]:
    """The small result a task passes on: the stage key and its outputs' content hashes."""
    from spa.run.layout import RunLayout

    run = RunLayout.of(run_config(config))
    entry = json.loads(run.manifest.read_text())["stages"][key]
    return {"stage": key, "outputs": entry["outputs"], "summary": entry.get("summary", {})}


def _run_name(stage: str):
    """A task-run name from the task's parameters, as the Prefect UI lists it: ``prepare``, ``evaluate t=0``,
    ``sample t=2 shard 1/4`` (the ``--shard`` value), ``merge samples t=2 (4 shards)``."""

    def name(parameters: dict[str, Any]) -> str:
        out = stage if parameters.get("t") is None else f"{stage} t={parameters['t']}"
        if parameters.get("shard"):
            out += f" shard {parameters['shard']}"
        if parameters.get("shards"):
            out += f" ({parameters['shards']} shards)"
        return out

    return name


def task_run_name(stage_task, **parameters: Any) -> str:
    """The name a run of ``stage_task`` with these parameters gets."""
    return stage_task.task_run_name(parameters=parameters)


def _task(stage: str):
    return task(name=stage.replace(" ", "-"), task_run_name=_run_name(stage), retries=2, retry_delay_seconds=10,
                retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)


@_task("prepare")
def prepare(config: str) -> dict[str, Any]:
    run_command(stage_command("prepare", config), config)
    return stage_record(config, "prepare")


@_task("seed")
def seed(config: str) -> dict[str, Any]:
    run_command(stage_command("seed", config), config)
    return stage_record(config, Stage.SEED.key())


@_task("sample")
def sample(config: str, t: int, shard: str | None = None) -> dict[str, Any]:
    group = run_config(config).sample.gpus_per_engine if shard else 1  # one engine's GPUs per shard
    run_command(stage_command("sample", config, t, *(["--shard", shard] if shard else [])), config,
                shard_env(shard, group))
    return stage_record(config, Stage.SAMPLE.key(t, parse_shard(shard) if shard else None))


@_task("merge samples")
def merge_samples(config: str, t: int, shards: int) -> dict[str, Any]:
    run_command(stage_command("sample", config, t, "--merge", str(shards)), config)
    return stage_record(config, Stage.SAMPLE.key(t))


@_task("judge")
def judge(config: str, t: int, shard: str | None = None) -> dict[str, Any]:
    run_command(stage_command("judge", config, t, *(["--shard", shard] if shard else [])), config, shard_env(shard, 1))
    return stage_record(config, Stage.JUDGE.key(t, parse_shard(shard) if shard else None))


@_task("merge judgments")
def merge_judgments(config: str, t: int, shards: int) -> dict[str, Any]:
    run_command(stage_command("judge", config, t, "--merge", str(shards)), config)
    return stage_record(config, Stage.JUDGE.key(t))


@_task("train")
def train(config: str, t: int) -> dict[str, Any]:
    run_command(stage_command("train", config, t), config)
    return stage_record(config, Stage.TRAIN.key(t))


@_task("evaluate")
def evaluate(config: str, t: int) -> dict[str, Any]:
    run_command(stage_command("evaluate", config, t), config)
    artifacts.publish_metrics(config)  # <prefix>-metrics: every iteration evaluated so far
    return stage_record(config, Stage.EVALUATE.key(t))


@_task("report")
def report(config: str) -> str:
    run_command(stage_command("report", config), config)
    artifacts.publish_report(config)  # <prefix>-report, -run-dir, -report-file
    from spa.run.layout import RunLayout

    return str(RunLayout.of(run_config(config)).report)
