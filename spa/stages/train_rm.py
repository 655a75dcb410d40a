"""``spa train-rm``: a Bradley-Terry reward model on the gold seed pairs -> ``judge.reward_model``.

The judge baseline ``judge.type: external_rm`` of the SPA paper (Table 2: PairRM) needs a reward
model; for offline tests and the demo world this trains a small one on the seed pairs, starting
from ``pi_init``'s backbone with a fresh 1-output head.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from spa.config import SPAConfig
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.run.manifest import Stage
from spa.run.stage_runner import StageResult, require, run_stage

SECTIONS = ["model", "judge"]


def _train_reward_model(cfg: SPAConfig, seed: Path, out: Path, epochs: int, lr: float) -> dict[str, Any]:
    from spa.judges.reward_model import train_reward_model

    table = read_table(seed, "seed")
    return train_reward_model(
        cfg.model.pi_init, out, table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
        table.column("rejected").to_pylist(), epochs=epochs, lr=lr, batch_size=cfg.judge.batch_size,
        max_length=cfg.model.max_length, seed=cfg.train.seed, trust_remote_code=cfg.model.trust_remote_code)


def run(cfg: SPAConfig, force: bool = False, echo=print, epochs: int | None = None,
        lr: float | None = None) -> StageResult:
    """Train the reward model (``epochs``/``lr``: the command line's overrides of judge.rm_epochs / rm_learning_rate)."""
    epochs = cfg.judge.rm_epochs if epochs is None else epochs
    lr = cfg.judge.rm_learning_rate if lr is None else lr
    if not cfg.judge.reward_model:
        raise ValueError("spa train-rm writes to judge.reward_model: set it in the config")
    layout = RunLayout.of(cfg)
    seed = require(layout.seed, "the seed set", "spa prepare")
    out = Path(cfg.judge.reward_model)

    body = partial(_train_reward_model, cfg, seed, out, epochs, lr)
    return run_stage(cfg, Stage.TRAIN_RM.key(), [seed, Path(cfg.model.pi_init)], SECTIONS, [out], body,
                     extra_key={"epochs": epochs, "lr": lr}, force=force, echo=echo)
