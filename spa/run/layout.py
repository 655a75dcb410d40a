"""Where every artifact of a run lives (docs/artifacts.md, "Run directory"): the one home of run paths.

No stage spells a file name of the run directory itself; each asks ``RunLayout``.
"""

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

    @classmethod
    def of(cls, cfg: SPAConfig) -> RunLayout:
        """The layout of the run directory ``cfg.run_dir``."""
        return cls(Path(cfg.run_dir))

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
    def log_file(self) -> Path:
        """The full log of the commands run on this run (the terminal shows the story: spa.run.console)."""
        return self.root / "logs" / "spa.log"

    def trackers(self, t: int) -> Path:
        """The experiment trackers' local files of iteration ``t`` (TensorBoard: one run per iteration)."""
        return self.root / "logs" / "trackers" / f"iter_{t}"

    @property
    def seed(self) -> Path:
        return self.data / "seed.parquet"

    @property
    def heldout(self) -> Path:
        return self.data / "heldout.parquet"

    def prompts(self, t: int) -> Path:
        return self.data / f"prompts_{t}.parquet"

    @property
    def unpaired(self) -> Path:
        """SSPO's unpaired set D_U (written by prepare when ``data.unpaired_source`` is set)."""
        return self.data / "unpaired.parquet"

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

    def train_pairs(self, t: int) -> Path:
        """The training set as trained on (replay, RPO's prompt embeddings), when the stage materialises it."""
        return self.iteration(t) / "train_pairs.parquet"

    def reference_logps(self, t: int) -> Path:
        """The reference's sequence log-probs, computed once before training (``train.precompute_reference``)."""
        return self.iteration(t) / "reference_logps.parquet"

    def spo_heads(self, t: int) -> Path:
        """SPO's auxiliary heads, beside (not inside) the policy weights."""
        return self.iteration(t) / "spo_heads.safetensors"

    def pseudo_labels(self, t: int) -> Path:
        """SSPO: per unpaired response and visit, its reward, the threshold and its pseudo-label."""
        return self.iteration(t) / "pseudo_labels.parquet"

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

    def model_outputs(self, t: int) -> Path:
        """pi_t's answers to the evaluation set, in alpaca-eval's format."""
        return self.iteration(t) / "model_outputs.json"

    def instruction_answers(self, t: int, name: str) -> Path:
        """pi_t's greedy answers to an instruction-following set and each constraint's verdict."""
        return self.iteration(t) / f"instructions_{name}.parquet"

    def mt_bench(self, t: int) -> Path:
        return self.iteration(t) / "mt_bench.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def demo_plot(self) -> Path:
        """``spa demo``'s six-panel plot of the oracle's metrics (beside report.md)."""
        return self.root / "demo_metrics.png"

    @property
    def demo_metrics(self) -> Path:
        """``spa demo``'s per-round oracle metrics of SPA and of each comparison arm."""
        return self.root / "demo_metrics.json"

    @property
    def incoming(self) -> Path:
        """Where the ``expand`` flow looks for new prompt batches by default."""
        return self.root / "incoming"

    @property
    def expansion_ledger(self) -> Path:
        """Which incoming prompt batches became which iteration (the ``expand`` flow)."""
        return self.root / "expansion.json"


def model_dir(cfg: SPAConfig, t: int) -> Path:
    """Directory of ``pi_t`` (``pi_0`` may be given in no-seed mode)."""
    if t == 0 and cfg.model.pi_0:
        return Path(cfg.model.pi_0)
    return RunLayout.of(cfg).model(t)


def save_resolved(config: SPAConfig, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config (all defaults filled in) to ``<run>/config.yaml``, atomically."""
    import yaml

    from spa.run.artifacts import write_text_atomic

    target = Path(run_dir or config.run_dir) / "config.yaml"
    return write_text_atomic(target, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
