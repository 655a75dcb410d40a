"""The stage tasks of one flow run as the steps of Algorithm 1, each reported to the run's progress when it ends.

Both flows (``spa-pipeline`` and ``spa-expand``) run their rounds through :func:`iteration`, so a round is
written once, sharding included; the progress artifact is updated around the tasks (:class:`Steps`), never
between the lines of the algorithm.
"""

from __future__ import annotations

from typing import Any

from prefect.futures import wait

from spa_tasks import stage_tasks as stages
from spa_tasks.artifacts import Progress


def sharded(step, merge, config: str, t: int, shards: int) -> dict[str, Any]:
    """Map a stage over ``shards`` chunk-aligned shards on the task runner, then merge them."""
    if shards <= 1:
        return step(config, t)
    futures = [step.submit(config, t, f"{i}/{shards}") for i in range(shards)]
    wait(futures)
    for f in futures:
        f.result()  # raise the first shard failure
    return merge(config, t, shards)


class Steps:
    """The stage tasks over one resolved config (sample and judge over ``shards``), each followed by one step of
    ``progress`` (none: no progress artifact)."""

    def __init__(self, config: str, shards: int = 1, progress: Progress | None = None):
        self.config, self.shards, self.progress = config, shards, progress

    def _done(self, what: str, result: Any) -> Any:
        if self.progress is not None:
            self.progress.step(what)
        return result

    def prepare(self) -> dict[str, Any]:
        return self._done("prepare", stages.prepare(self.config))

    def seed(self) -> dict[str, Any]:
        return self._done("seed", stages.seed(self.config))

    def sample(self, t: int) -> dict[str, Any]:
        return self._done(f"sample t={t}", sharded(stages.sample, stages.merge_samples, self.config, t, self.shards))

    def judge(self, t: int) -> dict[str, Any]:
        return self._done(f"judge t={t}", sharded(stages.judge, stages.merge_judgments, self.config, t, self.shards))

    def train(self, t: int) -> dict[str, Any]:
        return self._done(f"train t={t}", stages.train(self.config, t))

    def evaluate(self, t: int) -> dict[str, Any]:
        return self._done(f"evaluate t={t}", stages.evaluate(self.config, t))

    def report(self) -> str:
        return self._done("report", stages.report(self.config))


def iteration(steps: Steps, t: int) -> None:
    """Round ``t`` of Algorithm 1, from pi_{t-1} on the prompt set X_t."""
    steps.sample(t)  # y1, y2 ~ pi_{t-1}(.|x)
    steps.judge(t)  # Eq. 7-8: labels from pi_{t-1}'s implicit reward against pi_init
    steps.train(t)  # Eq. 9-12: refined DPO from pi_{t-1}
    steps.evaluate(t)
