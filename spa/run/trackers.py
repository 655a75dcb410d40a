"""Experiment trackers (``train.report_to``): one tracker run per iteration, and the stage summaries in it.

Training reports through transformers' own integrations (``TrainingArguments.report_to``): every optimiser
step's loss, learning rate, margins (``rewards/margins``), refined share (``refined_fraction``), ... of
:class:`spa.training.trainer.RefinedDPOTrainer`, under the run name ``<run dir name>-t<t>`` (``t = 0``: the
seed stage). TensorBoard's event files of iteration ``t`` go to ``<run>/logs/trackers/iter_<t>/``: each
iteration is one TensorBoard run, and ``tensorboard --logdir <run>/logs/trackers`` shows them side by side.
The judge and evaluate stages add their summary's numbers to the same run (:func:`log_summary`:
``judge/self_label_accuracy``, ``eval/win_rate``, ... at step ``t``); TensorBoard, wandb and mlflow take them.

A tracker never fails a stage: one that is unknown or not installed is left out of training, one that fails
to take a summary is skipped, each with one warning line. Only the summary numbers are sent, and a warning
names the failure without credentials (:func:`_redacted`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SUMMARY_TRACKERS = ("tensorboard", "wandb", "mlflow")
# transformers' availability check of a tracker where its name is not is_<name>_available
_AVAILABLE_FN = {"comet_ml": "is_comet_available", "azure_ml": "is_azureml_available",
                 "flyte": "is_flytekit_available"}


def tracker_dir(run_dir: str | os.PathLike, t: int) -> Path:
    """Where the trackers' local files of iteration ``t`` go (TensorBoard's event files)."""
    from spa.run.layout import RunLayout

    return RunLayout(Path(run_dir)).trackers(t)


def run_name(run_dir: str | os.PathLike, t: int) -> str:
    """The tracker run of iteration ``t``: ``<run dir name>-t<t>``."""
    return f"{Path(run_dir).resolve().name}-t{t}"


def run_id(run_dir: str | os.PathLike, t: int) -> str:
    """A stable id of iteration ``t``'s tracker run (wandb's run id: training and summaries share it)."""
    return hashlib.sha256(f"{Path(run_dir).resolve()}\0{t}".encode()).hexdigest()[:16]


def _redacted(exc: BaseException) -> str:
    """The first line of an error, without URL credentials or tokens, at most 200 characters."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = re.sub(r"://[^/@\s]+@", "://***@", text)
    text = re.sub(r"\b(hf|sk|wandb|api)[-_][A-Za-z0-9_-]{8,}", r"\1_***", text, flags=re.IGNORECASE)
    return f"{type(exc).__name__}: {text}"[:200]


def usable(names: list[str], warn: Callable[[str], None] = print) -> list[str]:
    """The trackers of ``names`` that transformers knows and that are installed; one warning per other."""
    if not names:
        return []
    from transformers.integrations import integration_utils as iu

    out = []
    for name in names:
        check = getattr(iu, _AVAILABLE_FN.get(name, f"is_{name}_available"), None)
        if name not in iu.INTEGRATION_TO_CALLBACK:
            warn(f"warning: train.report_to {name!r} is not a tracker transformers knows "
                 f"({', '.join(sorted(iu.INTEGRATION_TO_CALLBACK))}); left out")
        elif check is not None and not check():
            warn(f"warning: train.report_to {name!r}: its package is not installed (pip install {name}); left out")
        else:
            out.append(name)
    return out


def point_callbacks(trainer, run_dir: str | os.PathLike, t: int) -> None:
    """TensorBoard's event files of this round into :func:`tracker_dir` (not the checkpoint folder)."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(tracker_dir(run_dir, t))


@contextlib.contextmanager
def training_run(names: list[str], run_dir: str | os.PathLike, t: int) -> Iterator[None]:
    """Around a round's training: wandb resumes iteration ``t``'s run by its id (the summaries use it too),
    and its run is finished afterwards, so that the next round of an inline flow starts its own."""
    saved = {k: os.environ.get(k) for k in ("WANDB_RUN_ID", "WANDB_RESUME")}
    if "wandb" in names:
        os.environ.update(WANDB_RUN_ID=run_id(run_dir, t), WANDB_RESUME="allow")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        wandb = sys.modules.get("wandb")
        if "wandb" in names and wandb is not None and getattr(wandb, "run", None) is not None:
            with contextlib.suppress(Exception):
                wandb.run.finish()


def numbers(summary: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a (nested) summary as ``prefix/key`` scalars (booleans, texts and ``iteration``
    left out)."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        tag = f"{prefix}/{key}"
        if isinstance(value, dict):
            out |= numbers(value, tag)
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "iteration":
            if math.isfinite(value):
                out[tag] = float(value)
    return out


def _tensorboard(run_dir, t: int, scalars: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tracker_dir(run_dir, t)))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=t)
    finally:
        writer.close()


def _wandb(run_dir, t: int, scalars: dict[str, float]) -> None:
    import wandb

    active = wandb.run
    if active is not None and active.id != run_id(run_dir, t):
        active.finish()  # an earlier iteration's run, left open in this process
        active = None
    run = active or wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), id=run_id(run_dir, t),
                               name=run_name(run_dir, t), resume="allow")
    run.log(scalars)
    if active is None:
        run.finish()


def _mlflow(run_dir, t: int, scalars: dict[str, float]) -> None:
    import mlflow

    name = run_name(run_dir, t)
    quoted = name.replace("'", "\\'")
    found = mlflow.search_runs(filter_string=f"tags.mlflow.runName = '{quoted}'", max_results=1, output_format="list")
    with mlflow.start_run(run_id=found[0].info.run_id) if found else mlflow.start_run(run_name=name):
        mlflow.log_metrics(scalars, step=t)


_LOGGERS = {"tensorboard": _tensorboard, "wandb": _wandb, "mlflow": _mlflow}
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def log_summary(names: list[str], run_dir: str | os.PathLike, t: int, stage: str, summary: dict[str, Any],
                echo: Callable[[str], None] = print) -> list[str]:
    """Log a stage's summary numbers (``<stage>/<key>`` at step ``t``) to iteration ``t``'s tracker runs.

    Returns the trackers that took them; every other one gets one warning line through ``echo``."""
    scalars, done = numbers(summary, stage), []
    for name in names:
        where = f"[{stage}/{t}] warning: tracker {name}"
        if name not in _LOGGERS:
            echo(f"{where}: takes no stage summaries (only {', '.join(SUMMARY_TRACKERS)} do)")
        elif importlib.util.find_spec(_MODULES[name]) is None:
            echo(f"{where}: its package is not installed; the {stage} summary is not logged")
        else:
            try:
                _LOGGERS[name](run_dir, t, scalars)
                done.append(name)
            except Exception as exc:  # noqa: BLE001 -- a tracker never fails a stage
                echo(f"{where}: the {stage} summary was not logged ({_redacted(exc)})")
    return done
