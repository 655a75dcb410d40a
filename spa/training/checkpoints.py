"""Checkpoints of a training round: resume only a checkpoint of this exact run, else start clean.

``Trainer`` saves the weights, optimiser and scheduler; ``STATE_FILE`` beside them holds ours (the
train-log rows so far, the refinement windows, the per-sample flag records), so a resumed round
continues with the same window as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from spa.run.artifacts import write_text_atomic

STATE_FILE = "spa_state.json"
TRAINER_STATE = "trainer_state.json"  # transformers' own


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and (p / TRAINER_STATE).exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def prepare_checkpoint_dir(ckpt_dir: Path, run_key: str, save_steps: int | None = None) -> Path | None:
    """Return the checkpoint to resume from, if it belongs to this exact run; else start clean.

    ``save_steps`` is operational (not part of ``run_key``): it is written into the checkpoint's trainer state,
    since ``Trainer`` would otherwise keep saving at the checkpoint's cadence (and warn that they differ)."""
    key_file = ckpt_dir / "run_key.txt"
    if ckpt_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(run_key)
    last = latest_checkpoint(ckpt_dir)
    if last is not None and save_steps is not None:
        state = json.loads((last / TRAINER_STATE).read_text())
        if state.get("save_steps") != save_steps:
            write_text_atomic(last / TRAINER_STATE, json.dumps({**state, "save_steps": save_steps}, indent=2))
    return last
