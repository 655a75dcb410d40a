"""New prompt batches for more iterations (the ``expand`` flow's bookkeeping, no Prefect here).

A batch file in the incoming folder is used once (by content hash, in the ledger
``<run>/expansion.json``); its prompts that any earlier set already holds (seed,
held-out, every ``prompts_<t>``; normalised-prompt hash) are dropped and counted, so
no prompt is ever used twice. The batch becomes ``prompts_<t>`` of the next iteration.
A batch is marked ``pending`` before its iteration runs and ``done`` after, so a
crashed expansion resumes with the same iteration number and prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from spa.config import SPAConfig
from spa.data.sources import load_source, prompt_hash
from spa.errors import StageInputError
from spa.run.artifacts import file_sha256, iter_batches, write_table, write_text_atomic
from spa.run.layout import RunLayout
from spa.schemas import PROMPTS

BATCH_SUFFIXES = (".parquet", ".jsonl", ".json")


@dataclass(frozen=True)
class BatchPlan:
    batch: str
    digest: str
    iteration: int
    new_prompts: int
    overlap: int
    duplicates: int


def ledger_path(layout: RunLayout) -> Path:
    return layout.expansion_ledger


def read_ledger(layout: RunLayout) -> dict:
    path = ledger_path(layout)
    return json.loads(path.read_text()) if path.exists() else {"batches": {}}


def write_ledger(layout: RunLayout, ledger: dict) -> None:
    write_text_atomic(ledger_path(layout), json.dumps(ledger, indent=2, sort_keys=True))


def expanded_iterations(layout: RunLayout) -> dict[int, str]:
    """The iterations ``spa expand`` claimed (pending or done), each with the batch file its prompts came from."""
    return {e["iteration"]: e["file"] for e in read_ledger(layout)["batches"].values() if e.get("iteration")}


def existing_iterations(layout: RunLayout) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in layout.data.glob("prompts_*.parquet"))


def used_prompt_hashes(layout: RunLayout, exclude: int | None = None) -> set[str]:
    """Normalised-prompt hashes of every set the run already holds."""
    paths = [(layout.seed, "seed"), (layout.heldout, "heldout")]
    paths += [(layout.prompts(t), "prompts") for t in existing_iterations(layout) if t != exclude]
    used: set[str] = set()
    for path, kind in paths:
        if path.exists():
            for batch in iter_batches(path, kind):
                used.update(prompt_hash(p) for p in batch.column("prompt").to_pylist())
    return used


def incoming_batches(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.is_file() and p.suffix in BATCH_SUFFIXES)


def plan_batch(cfg: SPAConfig, batch: Path) -> BatchPlan | None:
    """Claim ``batch`` for the next iteration and write its fresh prompts; None if it was used already."""
    from spa.run.layout import model_dir

    layout = RunLayout.of(cfg)
    digest = file_sha256(batch)
    ledger = read_ledger(layout)
    entry = ledger["batches"].get(digest)
    if entry and entry["status"] == "done":
        return None
    t = entry["iteration"] if entry else max([newest_model(layout), *existing_iterations(layout)]) + 1
    if not model_dir(cfg, t - 1).exists():
        raise StageInputError(f"{batch}: iteration {t} starts from pi_{t - 1}, which does not exist yet; "
                              "finish the pipeline first (spa run)")
    used = used_prompt_hashes(layout, exclude=t)
    rows, seen, overlap, dups = [], set(), 0, 0
    for i, row in enumerate(load_source(str(batch))):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise StageInputError(f"{batch}: row {i}: 'prompt' is missing or empty")
        key = prompt_hash(prompt)
        if key in used:
            overlap += 1
        elif key in seen:
            dups += 1
        else:
            seen.add(key)
            rows.append({"prompt_id": key, "prompt": prompt})
    plan = BatchPlan(batch.name, digest, t, len(rows), overlap, dups)
    if not rows:
        ledger["batches"][digest] = {"file": batch.name, "iteration": None, "status": "done", "new": 0,
                                     "overlap": overlap, "duplicates": dups}
        write_ledger(layout, ledger)
        return plan
    write_table(pa.Table.from_pylist(rows, schema=PROMPTS.schema),
                layout.prompts(t), "prompts")
    ledger["batches"][digest] = {"file": batch.name, "iteration": t, "status": "pending", "new": len(rows),
                                 "overlap": overlap, "duplicates": dups}
    write_ledger(layout, ledger)
    return plan


def mark_done(layout: RunLayout, plan: BatchPlan) -> None:
    ledger = read_ledger(layout)
    ledger["batches"][plan.digest]["status"] = "done"
    write_ledger(layout, ledger)


def newest_model(layout: RunLayout) -> int:
    """Index of the newest finished model (``iter_t/model``), -1 if none."""
    ts = [int(p.parent.name.split("_")[1]) for p in layout.root.glob("iter_*/model") if p.is_dir()]
    return max(ts, default=-1)
