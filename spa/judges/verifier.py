"""Verifiable instructions: which of a prompt's constraints a response follows (IFEval's checkers).

A *task* is a prompt with the constraints it states, in IFEval's row format: ``prompt``,
``instruction_id_list`` (ids of IFEval's instruction registry, e.g. ``punctuation:no_comma``) and
``kwargs`` (one argument mapping per id, e.g. ``{"num_bullets": 3}``). The checkers are IFEval's own,
from the ``if-verifiable`` package (Apache-2.0), used as they are; what is ours is the validation of a
user's rows (an unknown id or a bad argument is one error naming the row, not a silently random
argument: IFEval's ``build_description`` draws any argument it is not given) and the *score* that
ranks two responses.

Strict and loose are IFEval's: strict checks the response as written; loose also accepts it after
removing markdown asterisks and/or its first or last line. A response's **score** is the mean of its
strict and loose shares of followed constraints (in [0, 1]): the share followed, with a response that
follows a constraint strictly ranked above one that follows it only loosely. The verifier plays the role
the demo world's oracle plays: gold labels for the seed, a judge with a full labelling budget, and the
diagnostics of every round (self-label accuracy against it).

Two instruction types need NLTK's sentence tokenizer data (``punkt_tab``), which is not installed with
NLTK and cannot be downloaded offline; tasks using them are *not checkable here* and are skipped and
counted where a set is scored (:func:`checkable`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spa.errors import InstructionError

NEEDS_NLTK_DATA = frozenset({"length_constraints:number_sentences", "change_case:capital_word_frequency"})
_PROBES = ("A probe answer.", "* one\n* two\n\nSECTION 1\n[x] <<t>> *h* P.S. done")


@functools.cache
def registry() -> dict[str, type]:
    """IFEval's instruction registry (id -> checker class), from ``if-verifiable``."""
    try:
        import langdetect
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as exc:
        raise InstructionError(f"verifiable instructions need the if-verifiable package ({exc}): "
                               "pip install if-verifiable (bash install.sh installs it)") from None
    langdetect.DetectorFactory.seed = 0  # the language checker is randomised unless seeded: verdicts must repeat
    return dict(INSTRUCTION_DICT)


@functools.cache
def nltk_data_present() -> bool:
    """Whether NLTK's ``punkt_tab`` data is installed (the two sentence-counting checkers need it)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english")
    except LookupError:
        return False
    return True


@dataclass(frozen=True)
class Task:
    """One prompt and the constraints it states (IFEval's row format)."""

    prompt: str
    instruction_ids: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]
    key: str | None = None

    def row(self) -> dict[str, Any]:
        """The task as an IFEval-format row (``key`` only when it has one)."""
        out = {"key": self.key} if self.key is not None else {}
        return out | {"prompt": self.prompt, "instruction_id_list": list(self.instruction_ids),
                      "kwargs": [dict(k) for k in self.kwargs]}


@dataclass(frozen=True)
class Verdict:
    """Per constraint of a task, whether a response follows it (strict, loose)."""

    strict: tuple[bool, ...]
    loose: tuple[bool, ...]

    @property
    def score(self) -> float:
        """The verifier's score: the mean of the strict and loose shares of followed constraints."""
        n = len(self.strict)
        return (sum(self.strict) + sum(self.loose)) / (2 * n) if n else 0.0

    @property
    def all_strict(self) -> bool:
        return bool(self.strict) and all(self.strict)

    @property
    def all_loose(self) -> bool:
        return bool(self.loose) and all(self.loose)


def _clean(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}  # IFEval's rows list unused arguments as null


def _seeded_args(cls: type, instruction_id: str, kwargs: dict[str, Any], seed: int) -> dict[str, Any]:
    """The arguments a checker ends up with after ``build_description(**kwargs)`` under a fixed random seed."""
    state = random.getstate()
    try:
        random.seed(seed)
        checker = cls(instruction_id)
        checker.build_description(**kwargs)
        return checker.get_instruction_args() or {}
    finally:
        random.setstate(state)


def _check_instruction(instruction_id: str, kwargs: Any, prompt: str, where: str) -> None:
    known = registry()
    if instruction_id not in known:
        raise InstructionError(f"{where}: unknown instruction id {instruction_id!r} (IFEval's registry has "
                               f"{len(known)}, e.g. punctuation:no_comma, detectable_format:title)")
    if not isinstance(kwargs, dict):
        raise InstructionError(f"{where}: the arguments of {instruction_id} must be a mapping, got {kwargs!r}")
    args = _clean(kwargs)
    cls = known[instruction_id]
    try:
        built = [_seeded_args(cls, instruction_id, args, seed) for seed in range(4)]
    except (TypeError, ValueError, KeyError) as exc:
        raise InstructionError(f"{where}: bad arguments {args} for {instruction_id}: {exc}") from None
    drawn = sorted(k for k in built[0] if k not in args and any(b.get(k) != built[0][k] for b in built[1:]))
    if drawn:  # IFEval would silently draw these at random, and every check would use another value
        raise InstructionError(f"{where}: {instruction_id} needs the argument(s) {', '.join(drawn)} "
                               f"(given: {sorted(args) or 'none'})")
    if instruction_id in NEEDS_NLTK_DATA and not nltk_data_present():
        return  # valid, but its checker cannot run here: counted as not checkable where a set is scored
    checker = cls(instruction_id)
    checker.build_description(**args)
    try:
        for probe in _PROBES:
            checker.check_following(probe)
    except Exception as exc:  # noqa: BLE001 - a wrongly typed argument fails inside IFEval's checker
        raise InstructionError(f"{where}: bad arguments {args} for {instruction_id}: the check fails with "
                               f"{type(exc).__name__}: {exc}") from None


def parse_task(row: Any, where: str) -> Task:
    """One IFEval-format row as a :class:`Task`, validated; an error names ``where`` (file and row)."""
    if not isinstance(row, dict):
        raise InstructionError(f"{where}: expected an object with prompt, instruction_id_list and kwargs")
    prompt, ids, kwargs = row.get("prompt"), row.get("instruction_id_list"), row.get("kwargs")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InstructionError(f"{where}: 'prompt' is missing or empty")
    if not isinstance(ids, list | tuple) or not ids or not all(isinstance(i, str) for i in ids):
        raise InstructionError(f"{where}: 'instruction_id_list' must be a non-empty list of instruction ids")
    kwargs = [{} for _ in ids] if kwargs is None else kwargs
    if not isinstance(kwargs, list | tuple) or len(kwargs) != len(ids):
        raise InstructionError(f"{where}: 'kwargs' must be a list with one mapping per instruction id "
                               f"({len(ids)} ids)")
    for instruction_id, args in zip(ids, kwargs, strict=True):
        _check_instruction(instruction_id, args, prompt, where)
    key = row.get("key", row.get("prompt_id"))
    return Task(prompt, tuple(ids), tuple(_clean(k) for k in kwargs), None if key is None else str(key))


def read_rows(path: str | Path) -> list[Any]:
    """The rows of a JSONL, JSON (a list) or Parquet file; an unreadable line is an error naming it."""
    from spa.evaluation.eval_sets import read_rows as read

    path = Path(path)
    if not path.is_file():
        raise InstructionError(f"{path}: no such file of verifiable-instruction rows")
    return read(path, InstructionError)


def load_tasks(path: str | Path) -> list[Task]:
    """Every row of an IFEval-format file, validated (the first bad row is one error naming it)."""
    rows = read_rows(path)
    if not rows:
        raise InstructionError(f"{path}: no rows")
    return [parse_task(row, f"{path}: row {i}") for i, row in enumerate(rows)]


def checkable(task: Task) -> bool:
    """Whether every constraint of ``task`` can be checked here (NLTK's sentence data for two of them)."""
    return nltk_data_present() or not NEEDS_NLTK_DATA.intersection(task.instruction_ids)


def verify(task: Task, response: str) -> Verdict:
    """IFEval's strict and loose check of every constraint of ``task`` on ``response``."""
    from if_verifiable.common import evaluate_instructions

    if not checkable(task):
        raise InstructionError(f"the task {task.prompt[:60]!r} uses {sorted(NEEDS_NLTK_DATA & set(task.instruction_ids))}, "
                               "whose checkers need NLTK's punkt_tab data (not installed): skip it or install the data")
    results, _ = evaluate_instructions(response=response, instruction_id_list=list(task.instruction_ids),
                                       kwargs_list=[dict(k) for k in task.kwargs], prompt=task.prompt,
                                       instruction_registry=registry())
    if not results:  # IFEval scores an empty response as following nothing
        return Verdict((False,) * len(task.instruction_ids), (False,) * len(task.instruction_ids))
    return Verdict(tuple(r.strict_pass for r in results), tuple(r.loose_pass for r in results))


def prompt_key(prompt: str) -> str:
    """How a prompt is looked up among the tasks: its text with whitespace runs collapsed."""
    return " ".join(prompt.split())


class TaskIndex:
    """The tasks of a file, looked up by prompt text (the stages pass prompts, not task rows)."""

    def __init__(self, tasks: Sequence[Task], where: str):
        self.where = where
        self.by_prompt = {prompt_key(t.prompt): t for t in tasks}

    def __getitem__(self, prompt: str) -> Task:
        try:
            return self.by_prompt[prompt_key(prompt)]
        except KeyError:
            raise InstructionError(f"{self.where} has no task for the prompt {prompt[:80]!r}: the verifier needs "
                                   "the constraints of every prompt it judges") from None

    def scores(self, prompts: Sequence[str], responses: Sequence[Sequence[str]]) -> list[list[float]]:
        """The verifier's score of every response (``responses[i]`` answers ``prompts[i]``)."""
        return [[verify(self[p], y).score for y in ys] for p, ys in zip(prompts, responses, strict=True)]


@functools.cache
def task_index(path: str) -> TaskIndex:
    """The (cached) index of an IFEval-format file."""
    return TaskIndex(load_tasks(path), path)


def preference(index: TaskIndex, prompt: str, output_1: str, output_2: str) -> float:
    """alpaca-eval's encoding of the verifier's preference: 1 (``output_1`` scores higher), 2, or 1.5 (equal)."""
    task = index[prompt]
    a, b = verify(task, output_1).score, verify(task, output_2).score
    return 1.0 if a > b else 2.0 if b > a else 1.5


@dataclass(frozen=True)
class VerifierOracle:
    """The verifier as an annotator ``fn(prompt, output_1, output_2) -> 1 | 1.5 | 2`` over one task file."""

    path: str

    def __call__(self, prompt: str, output_1: str, output_2: str) -> float:
        return preference(task_index(self.path), prompt, output_1, output_2)
