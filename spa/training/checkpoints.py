"""Checkpoints of a training round: resume only a checkpoint of this exact run, else start clean.

``Trainer`` saves the weights, optimiser and scheduler; ``STATE_FILE`` beside them holds ours (the
train-log rows so far, the refinement windows, the per-sample flag records), so a resumed round
continues with the same window as an uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

STATE_FILE = "spa_state.json"


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def prepare_checkpoint_dir(ckpt_dir: Path, run_key: str) -> Path | None:
    """Return the checkpoint to resume from, if it belongs to this exact run; else start clean."""
    key_file = ckpt_dir / "run_key.txt"
    if ckpt_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(run_key)
    return latest_checkpoint(ckpt_dir)
