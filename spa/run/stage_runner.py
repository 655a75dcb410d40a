"""Run one stage idempotently: skip when up to date, record the manifest entry after success."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa.config import SPAConfig
from spa.errors import StageInputError
from spa.run.artifacts import remove_orphans
from spa.run.layout import RunLayout, save_resolved
from spa.run.manifest import Manifest, hash_inputs, is_up_to_date, make_entry, stage_key

log = logging.getLogger(__name__)
# the numbers a stage's done-line shows (its full summary is in the manifest and the run's log)
KEY_NUMBERS = {
    "prepare": ("seed", "heldout", "prompts_1", "prompts_2", "prompts_3"),
    "seed": ("steps", "first_loss", "final_loss"),
    "sample": ("prompts", "responses", "mean_tokens", "truncated_share"),
    "judge": ("pairs", "ties", "dropped", "mean_p_chosen", "self_label_accuracy"),
    "train": ("steps", "first_loss", "final_loss", "mean_refined_fraction"),
    "evaluate": ("n", "win_rate", "lc_win_rate", "gold_agreement"),
}


def key_numbers(key: str, summary: dict[str, Any]) -> str:
    """``k=v`` for the stage's :data:`KEY_NUMBERS` that its summary holds (all of it for other stages)."""
    names = KEY_NUMBERS.get(key.split("/")[0])
    items = [(k, summary[k]) for k in names if k in summary] if names else list(summary.items())
    shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items
             if isinstance(v, int | float | str)]
    return ", ".join(shown) or "ok"


@dataclass(frozen=True)
class StageResult:
    key: str
    skipped: bool
    outputs: list[str]
    summary: dict[str, Any]


def require(path: Path, what: str, stage_hint: str) -> Path:
    """Fail with one clear message when an input of the previous stage is missing."""
    if not Path(path).exists():
        raise StageInputError(f"{path}: {what} is missing; run `{stage_hint}` first")
    return Path(path)


def expected_key(cfg: SPAConfig, inputs: Sequence[Path], config_sections: Sequence[str],
                 extra_key: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest key a stage with these inputs and config sections must match to be up to date."""
    expected = stage_key(hash_inputs(inputs, RunLayout.of(cfg).root), cfg.section_hash(*config_sections))
    if extra_key:
        expected["extra"] = extra_key
    return expected


def run_stage(
    cfg: SPAConfig,
    key: str,
    inputs: Sequence[Path],
    config_sections: Sequence[str],
    outputs: Sequence[Path],
    body: Callable[[], dict[str, Any]],
    extra_key: dict[str, Any] | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> StageResult:
    """Run ``body`` unless the manifest says ``key`` is up to date for these inputs and config.

    ``body`` writes ``outputs`` (atomically) and returns a small summary dict.
    """
    layout = RunLayout.of(cfg)
    save_resolved(cfg)
    manifest = Manifest(layout.manifest)
    expected = expected_key(cfg, inputs, config_sections, extra_key)
    if not force and is_up_to_date(manifest, key, expected):
        summary = manifest.get(key).get("summary", {})
        echo(f"[{key}] up to date (same inputs and config); nothing to do")
        return StageResult(key, True, [str(o) for o in outputs], summary)
    manifest.forget(key)
    for orphan in remove_orphans(outputs):
        echo(f"[{key}] removed {orphan.name}, left by an interrupted earlier attempt")
    started = time.time()
    summary = body()
    missing = [str(o) for o in outputs if not Path(o).exists()]
    if missing:
        raise RuntimeError(f"[{key}] finished without writing {missing}")
    manifest.record(key, make_entry(expected, outputs, started, summary, layout.root))
    elapsed = time.time() - started
    log.info("stage %s summary: %s", key, json.dumps(summary, default=str))
    echo(f"[{key}] done in {elapsed:.1f}s: {key_numbers(key, summary)}")
    return StageResult(key, False, [str(o) for o in outputs], summary)
