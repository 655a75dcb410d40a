"""A run's results as Prefect artifacts, where Prefect users look (the flow run's Artifacts tab).

Every key starts with the run's prefix, ``spa-<run directory name>-<6 hex digits of its absolute path>``
(lowercase letters, digits and dashes: ``runs/Zephyr_v2`` -> ``spa-zephyr-v2-1a2b3c``, ``runs/demo/run`` ->
``spa-demo-run-1a2b3c``), so reruns of one run directory stack new versions under the same keys and two runs
never overwrite each other's:

- ``<prefix>-metrics`` (table, after each evaluate): one row per evaluated iteration so far, read from
  ``iter_t/eval.json`` and ``iter_t/judge_summary.json``.
- ``<prefix>-report`` (markdown, after the report task): ``report.md`` under links to the run directory.
- ``<prefix>-run-dir`` and ``<prefix>-report-file`` (links): the run directory and ``report.md``.
- ``<prefix>-progress`` (progress, ``spa-pipeline`` only): the share of the flow's stages done.

Publishing never fails a run: any error (the API unreachable, a file unreadable) is one warning line.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import MissingContextError

from spa.run.layout import RunLayout

# column -> (summary file, key): the judge's summary exists from iteration 1 on (the seed stage judges nothing)
METRICS = {"win rate": "win_rate", "LC win rate": "lc_win_rate", "gold agreement": "gold_agreement",
           "self-label accuracy": "self_label_accuracy", "mean length": "avg_length"}


GENERIC_NAMES = {"run", "runs", "out", "output", "outputs"}  # named with their parent: runs/quickstart/run


def key_prefix(run_dir: str | Path) -> str:
    """``spa-<sanitised directory name>-<hash of the absolute path>``: stable per run directory, distinct across.
    A generic name (``run``) is preceded by its parent's: ``runs/demo/run`` -> ``spa-demo-run-<hash>``."""
    path = Path(run_dir).resolve()
    readable = f"{path.parent.name}-{path.name}" if path.name.lower() in GENERIC_NAMES else path.name
    name = re.sub(r"[^a-z0-9]+", "-", readable.lower()).strip("-")[:40].strip("-") or "run"
    return f"spa-{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:6]}"


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def never_fails(fn):
    """Run ``fn``; on any error log one warning line and return None (an artifact is never worth a run)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong, the run goes on
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            _logger().warning("Prefect artifact not published (%s: %s: %s); the run goes on",
                              fn.__name__, type(exc).__name__, first)
            return None

    return wrapper


def _layout(config: str) -> RunLayout:
    from spa_tasks.run_config import run_config

    return RunLayout.of(run_config(config))


def metrics_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """One row per iteration with an ``eval.json`` (iteration 0 is the seed stage; absent in no-seed mode):
    the closing table's rows (:func:`spa.run.summary.iteration_rows`) under the artifact's column names."""
    from spa.run.summary import iteration_rows

    return [{"iteration": r["iteration"], **{col: r[key] for col, key in METRICS.items()},
             **{f"{col} (%)": v for col, v in r["instruction_following"].items()}}
            for r in iteration_rows(layout) if r["evaluated"]]


@never_fails
def publish_metrics(config: str) -> None:
    """The ``<prefix>-metrics`` table: every iteration evaluated so far."""
    layout = _layout(config)
    create_table_artifact(metrics_rows(layout), key=f"{key_prefix(layout.root)}-metrics",
                          description=f"SPA metrics per iteration of `{layout.root}` (win rates in %, "
                                      "mean length in tokens; empty where not measured)")


@never_fails
def publish_report(config: str) -> None:
    """``report.md`` as ``<prefix>-report``, and links to the run directory and the report file."""
    layout = _layout(config)
    prefix, root, report = key_prefix(layout.root), layout.root.resolve(), layout.report.resolve()
    links = f"Run directory: [`{root}`]({root.as_uri()}); report: [`{report}`]({report.as_uri()})"
    create_markdown_artifact(f"{links}\n\n{report.read_text()}", key=f"{prefix}-report",
                             description=f"report.md of `{root}`")
    create_link_artifact(root.as_uri(), link_text=str(root), key=f"{prefix}-run-dir", description="the run directory")
    create_link_artifact(report.as_uri(), link_text=str(report), key=f"{prefix}-report-file",
                         description="the run's report.md")


class Progress:
    """The share of a flow's stages done, as one ``<prefix>-progress`` artifact per flow run."""

    def __init__(self, run_dir: str | Path, total: int):
        self.key, self.total, self.done = f"{key_prefix(run_dir)}-progress", total, 0
        self.id = never_fails(create_progress_artifact)(0.0, key=self.key, description=f"0 of {total} stages done")

    def step(self, what: str) -> None:
        """One more stage done (``what``); nothing to update where creating the artifact failed."""
        self.done += 1
        if self.id is not None:
            never_fails(update_progress_artifact)(self.id, 100.0 * self.done / self.total,
                                                  description=f"{what} done ({self.done} of {self.total} stages)")
