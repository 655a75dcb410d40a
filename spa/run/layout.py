"""Where every artifact of a run lives (`../shared/spec/ARTIFACTS.md`, "Run directory")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spa.config import SPAConfig


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory; ``iter_0`` holds the seed stage."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def seed(self) -> Path:
        return self.data / "seed.parquet"

    @property
    def heldout(self) -> Path:
        return self.data / "heldout.parquet"

    def prompts(self, t: int) -> Path:
        return self.data / f"prompts_{t}.parquet"

    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def model(self, t: int) -> Path:
        return self.iteration(t) / "model"

    def responses(self, t: int) -> Path:
        return self.iteration(t) / "responses.parquet"

    def judgments(self, t: int) -> Path:
        return self.iteration(t) / "judgments.parquet"

    def judge_summary(self, t: int) -> Path:
        """The judge stage's counts and label diagnostics (``spa.judges.diagnostics``)."""
        return self.iteration(t) / "judge_summary.json"

    def oracle_verdicts(self, t: int) -> Path:
        """Per judged pair, the oracle's verdict on its label (only with ``judge.oracle``)."""
        return self.iteration(t) / "oracle_verdicts.parquet"

    def refinement(self, t: int) -> Path:
        """Per training sample, both detectors' confidences and flags (SR on)."""
        return self.iteration(t) / "refinement.parquet"

    def train_log(self, t: int) -> Path:
        return self.iteration(t) / "train_log.parquet"

    def checkpoints(self, t: int) -> Path:
        return self.iteration(t) / "checkpoints"

    def eval_table(self, t: int) -> Path:
        return self.iteration(t) / "eval.parquet"

    def eval_summary(self, t: int) -> Path:
        return self.iteration(t) / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"


def model_dir(cfg: SPAConfig, t: int) -> Path:
    """Directory of ``pi_t`` (``pi_0`` may be given in no-seed mode)."""
    if t == 0 and cfg.model.pi_0:
        return Path(cfg.model.pi_0)
    return RunLayout(Path(cfg.run_dir)).model(t)
