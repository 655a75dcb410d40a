"""``spa train-rm``: a Bradley-Terry reward model on the gold seed pairs -> ``judge.reward_model``.

The judge baseline ``judge.type: external_rm`` of the SPA paper (Table 2: PairRM) needs a reward
model; for offline tests and the demo world this trains a small one on the seed pairs, starting
from ``pi_init``'s backbone with a fresh 1-output head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spa.config import SPAConfig
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.stages.runner import StageResult, require, run_stage

SECTIONS = ["model", "judge"]
EPOCHS, LR = 3, 1e-4


def run(cfg: SPAConfig, force: bool = False, echo=print, epochs: int = EPOCHS, lr: float = LR) -> StageResult:
    if not cfg.judge.reward_model:
        raise ValueError("spa train-rm writes to judge.reward_model: set it in the config")
    layout = RunLayout(Path(cfg.run_dir))
    seed = require(layout.seed, "the seed set", "spa prepare")
    out = Path(cfg.judge.reward_model)

    def body() -> dict[str, Any]:
        from spa.judges.reward_model import train_reward_model

        table = read_table(seed, "seed")
        return train_reward_model(
            cfg.model.pi_init, out, table.column("prompt").to_pylist(), table.column("chosen").to_pylist(),
            table.column("rejected").to_pylist(), epochs=epochs, lr=lr, batch_size=cfg.judge.batch_size,
            max_length=cfg.model.max_length, seed=cfg.train.seed, trust_remote_code=cfg.model.trust_remote_code)

    return run_stage(cfg, "train-rm", [seed, Path(cfg.model.pi_init)], SECTIONS, [out], body,
                     extra_key={"epochs": epochs, "lr": lr}, force=force, echo=echo)
