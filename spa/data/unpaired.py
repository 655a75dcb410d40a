"""The unpaired set ``D_U`` of SSPO (docs/variants.md, section 7): prompts with ONE response each, no label.

``spa prepare`` reads it from ``data.unpaired_source`` (any format ``data.source`` takes) and writes
``<run>/data/unpaired.parquet``. A row is ``prompt`` + ``response`` (strings), or a ``messages`` list whose first
user turn is the prompt and whose last assistant turn is the response (the SFT-data layout of UltraChat, the set
the SSPO paper uses). Rows are dropped, and counted, when the prompt or response is empty, when the same
(prompt, response) appeared earlier, or when the prompt is one of the run's seed, held-out or prompt-set prompts
(same normalised text): the unpaired set must not leak the gold pairs or the rounds' prompts. A row that is not
readable at all (no response column, a null) stops prepare with one line naming it, before anything is written.

Two streamed passes, like the splits (memory does not grow with the texts): hashes and checks first, then the
chosen rows written in source order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from spa.data.sources import Source, iter_source, prompt_hash
from spa.errors import StageInputError
from spa.run.artifacts import write_table
from spa.schemas import UNPAIRED_WRITTEN

_COLUMNS = "a 'prompt' and a 'response' column, or a 'messages' list with a user and an assistant turn"


def _text(value: Any, row: int, column: str, source: Source | str) -> str:
    if value is None:
        raise StageInputError(f"{source}: column {column!r} row {row}: the value is null")
    if not isinstance(value, str):
        raise StageInputError(f"{source}: column {column!r} row {row}: expected a string, got {type(value).__name__}")
    return value


def _turn(messages: Any, role: str, last: bool, row: int, source: Source | str) -> str | None:
    if not isinstance(messages, list | tuple):
        raise StageInputError(f"{source}: column 'messages' row {row}: expected a list of messages, "
                              f"got {type(messages).__name__}")
    for msg in reversed(messages) if last else messages:
        if isinstance(msg, dict) and msg.get("role") == role:
            return str(msg.get("content") or "")
    return None


def unpaired_record(row: dict[str, Any], i: int, source: Source | str) -> tuple[str, str]:
    """``(prompt, response)`` of one unpaired source row; a row that has neither layout names itself."""
    messages = row.get("messages")
    prompt = _text(row["prompt"], i, "prompt", source) if "prompt" in row else (
        _turn(messages, "user", False, i, source) if messages is not None else None)
    for column in ("response", "completion"):
        if column in row:
            response = _text(row[column], i, column, source)
            break
    else:
        response = _turn(messages, "assistant", True, i, source) if messages is not None else None
    if prompt is None or response is None:
        raise StageInputError(f"{source}: row {i} has no {'prompt' if prompt is None else 'response'} "
                              f"(its columns: {', '.join(row) or 'none'}); an unpaired source needs {_COLUMNS}")
    return prompt, response


def _u64(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


@dataclass
class UnpairedPlan:
    """Which rows of the unpaired source are written (``rows``, ascending) and the counts of the others."""

    rows: np.ndarray
    report: dict[str, int]


def plan_unpaired(source: Source, taken_prompts: np.ndarray, size: float | None, shuffle_seed: int) -> UnpairedPlan:
    """Pass 1: read every row (a malformed one raises here, before any file is written), drop the empty, the
    repeated and the ones whose prompt is among ``taken_prompts`` (uint64 normalised-prompt hashes of the run's
    splits, as ``spa.stages.prepare`` computes them), then draw ``size`` rows (a count, a fraction < 1, or all)."""
    taken = set(int(k) for k in taken_prompts)
    seen: set[int] = set()
    keep: list[int] = []
    counts = {"empty": 0, "duplicate": 0, "overlap_with_run_prompts": 0}
    i = 0
    for batch in iter_source(source):
        for row in batch:
            prompt, response = unpaired_record(row, i, source)
            if not prompt.strip() or not response.strip():
                counts["empty"] += 1
            elif (int(pid := prompt_hash(prompt), 16) or 1) in taken:
                counts["overlap_with_run_prompts"] += 1
            else:
                key = _u64(pid + "\x00" + response)
                if key in seen:
                    counts["duplicate"] += 1
                else:
                    seen.add(key)
                    keep.append(i)
            i += 1
    if not i:
        raise StageInputError(f"{source}: no rows; an unpaired source needs {_COLUMNS}")
    if size is not None and size >= 1 and size != int(size):
        raise StageInputError(f"data.unpaired_size={size}: give a whole count (>= 1) or a fraction (< 1)")
    usable = np.asarray(keep, dtype=np.int64)
    want = len(usable) if size is None else int(round(size * len(usable))) if size < 1 else int(size)
    if want > len(usable):
        raise StageInputError(f"{source}: {len(usable)} usable unpaired rows of {i} ({counts['empty']} empty, "
                              f"{counts['duplicate']} repeated, {counts['overlap_with_run_prompts']} with a prompt of "
                              f"the run's splits), but data.unpaired_size asks for {want}")
    chosen = np.sort(np.random.default_rng([shuffle_seed, 0xD0]).permutation(usable)[:want])
    return UnpairedPlan(chosen, {"rows_in": i, **counts, "unpaired": int(want)})


def write_unpaired(source: Source, plan: UnpairedPlan, target) -> None:
    """Pass 2: stream the source again and write the planned rows (atomically, validated) to ``target``."""
    wanted = plan.rows
    out: dict[str, list] = {"prompt_id": [], "prompt": [], "response": [], "source_row": []}
    start, pos = 0, 0
    for batch in iter_source(source):
        while pos < len(wanted) and wanted[pos] < start + len(batch):
            i = int(wanted[pos])
            prompt, response = unpaired_record(batch[i - start], i, source)
            out["prompt_id"].append(prompt_hash(prompt))
            out["prompt"].append(prompt)
            out["response"].append(response)
            out["source_row"].append(i)
            pos += 1
        start += len(batch)
    write_table(pa.table(out, schema=UNPAIRED_WRITTEN), target, "unpaired")
