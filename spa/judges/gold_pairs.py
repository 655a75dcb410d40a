"""Gold preference pairs from a verifier: ``k`` on-policy samples of ``pi_init`` per prompt, best vs worst.

The seed of a verifiable-instruction run is realistic on-policy data, as a labelling team would
produce it: ``pi_init`` answers each labelled prompt ``k`` times (the run's sampling settings), the
verifier scores every answer (:mod:`spa.judges.verifier`), and the best-scored answer is ``chosen``
and the worst ``rejected`` (the first of equals). A prompt whose answers all score the same is a
tie: it gets no pair (it stays a prompt for the prompt sets) and is counted. Prompts not labelled
are written as prompt-only rows, so the output is the run's ``data.source``: ``spa prepare`` draws
the seed and held-out gold pairs from the labelled rows and the prompt sets from the rest.

The samples are kept beside the output (``<out>.samples.parquet``) under a key of their inputs, so a
rerun after a kill, or with another ``k`` of the same samples, does not sample again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spa.config import SPAConfig
from spa.errors import InstructionError
from spa.judges.verifier import Task, load_tasks, verify
from spa.run.artifacts import write_text_atomic


@dataclass(frozen=True)
class GoldPlan:
    """How many prompts to label, with how many samples each."""

    prompts: int
    samples: int = 4
    seed: int = 0  # which tasks are labelled (a seeded order); runs with other data.shuffle_seed values share them


def labelled_order(tasks: list[Task], seed: int) -> np.ndarray:
    """The seeded order in which tasks are taken for labelling (the first ``prompts`` of it are labelled)."""
    return np.random.default_rng(seed).permutation(len(tasks))


def best_worst(scores: list[float], texts: list[str]) -> tuple[int, int] | None:
    """Indices of the best and worst answer (first of equals), or None when every answer scores the same or
    the two are the same text (a tie: no gold preference)."""
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] == scores[worst] or texts[best] == texts[worst]:
        return None
    return best, worst


def _samples_key(cfg: SPAConfig, tasks_path: Path, plan: GoldPlan, order: np.ndarray) -> str:
    from spa.run.manifest import content_hash

    spec = {"model": content_hash(cfg.model.pi_init), "tasks": content_hash(tasks_path), "n": plan.samples,
            "prompts": order[: plan.prompts].tolist(), "sample": cfg.section_hash("sample"),
            "max_length": cfg.model.max_length, "dtype": cfg.model.dtype}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def sample_answers(cfg: SPAConfig, prompts: list[str], plan: GoldPlan, cache: Path, key: str,
                   echo=print) -> list[list[str]]:
    """``plan.samples`` answers of ``pi_init`` per prompt (the run's sampling settings and environment), reusing
    ``cache`` when it holds the samples of the same key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spa.models.remote_sampling import sampler_for
    from spa.models.sampling import SamplingSpec
    from spa.run.artifacts import atomic_path

    if cache.exists() and (pq.read_schema(cache).metadata or {}).get(b"spa_key", b"").decode() == key:
        echo(f"[gold-pairs] reusing the samples in {cache}")
        return pq.read_table(cache).column("responses").to_pylist()
    spec = SamplingSpec.from_config(cfg.sample, cfg.model, n=plan.samples)
    samples = sampler_for(cfg.sample.python, cfg.sample.backend, cfg.model.pi_init, spec)(prompts, progress="gold pairs")
    answers = [s.responses for s in samples]
    table = pa.table({"prompt": prompts, "responses": answers}).replace_schema_metadata({"spa_key": key})
    with atomic_path(cache) as tmp:
        pq.write_table(table, tmp)
    return answers


def gold_rows(tasks: list[Task], order: np.ndarray, answers: list[list[str]], plan: GoldPlan
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The source rows (labelled first, in ``order``; then every other task as a prompt-only row) and the counts."""
    labelled = order[: plan.prompts]
    rows, ties, scores_all, chosen_scores, rejected_scores = [], 0, [], [], []
    for i, ys in zip(labelled, answers, strict=True):
        task = tasks[int(i)]
        scores = [verify(task, y).score for y in ys]
        scores_all += scores
        pick = best_worst(scores, ys)
        if pick is None:
            ties += 1
            rows.append(_row(task))
            continue
        (c, r), (sc, sr) = (ys[pick[0]], ys[pick[1]]), (scores[pick[0]], scores[pick[1]])
        chosen_scores.append(sc)
        rejected_scores.append(sr)
        rows.append(_row(task, c, r, sc, sr))
    rows += [_row(tasks[int(i)]) for i in order[plan.prompts:]]
    counts = {"tasks": len(tasks), "labelled_prompts": int(len(labelled)), "samples_per_prompt": plan.samples,
              "pairs": int(len(labelled)) - ties, "ties_dropped": ties,
              "mean_sample_score": float(np.mean(scores_all)) if scores_all else None,
              "mean_chosen_score": float(np.mean(chosen_scores)) if chosen_scores else None,
              "mean_rejected_score": float(np.mean(rejected_scores)) if rejected_scores else None}
    return rows, counts


def _row(task: Task, chosen: str = "", rejected: str = "", chosen_score: float | None = None,
         rejected_score: float | None = None) -> dict[str, Any]:
    """A source row; without a key ``spa prepare`` gives the prompt its hash as id."""
    return {"prompt_id": task.key, "prompt": task.prompt, "chosen": chosen, "rejected": rejected,
            "chosen_score": chosen_score, "rejected_score": rejected_score,
            "instruction_id_list": list(task.instruction_ids), "kwargs": [dict(k) for k in task.kwargs]}


def build_gold_source(cfg: SPAConfig, plan: GoldPlan, out: Path | None = None, echo=print) -> dict[str, Any]:
    """Label ``plan.prompts`` tasks of ``judge.instructions`` with ``pi_init``'s samples and the verifier, and write
    every task to ``out`` (default ``data.source``) in the source format; returns the counts (also written to
    ``<out>.summary.json``). Nothing is written when a task row is bad."""
    if not cfg.judge.instructions:
        raise InstructionError("spa gold-pairs needs judge.instructions: the file of IFEval-format task rows")
    out = Path(out or cfg.data.source or "")
    if not out.name:
        raise InstructionError("spa gold-pairs writes data.source: set it in the config (or give --out)")
    tasks_path = Path(cfg.judge.instructions)
    tasks = load_tasks(tasks_path)  # validated before any model work
    if not 0 < plan.prompts <= len(tasks):
        raise InstructionError(f"{tasks_path}: {len(tasks)} tasks; cannot label {plan.prompts}")
    order = labelled_order(tasks, plan.seed)
    prompts = [tasks[int(i)].prompt for i in order[: plan.prompts]]
    cache = out.with_name(out.name + ".samples.parquet")
    answers = sample_answers(cfg, prompts, plan, cache, _samples_key(cfg, tasks_path, plan, order), echo)
    rows, counts = gold_rows(tasks, order, answers, plan)
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))
    counts |= {"source": str(out), "plan": asdict(plan)}
    write_text_atomic(out.with_name(out.name + ".summary.json"), json.dumps(counts, indent=2))
    return counts
