"""``spa prepare``: split preference data into the seed D_0, prompt sets X_1..X_T and held-out gold pairs.

Prompt sets are disjoint from each other and from the seed (SPA.md, iteration step 1)
by a hash of the normalised prompt; duplicates and empty prompts are dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spa.artifacts import write_table
from spa.config import SPAConfig
from spa.layout import RunLayout
from spa.stages.runner import StageInputError, StageResult, run_stage

_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form used for disjointness and ids."""
    return _SPACE.sub(" ", text).strip().lower()


def prompt_hash(text: str) -> str:
    """Stable prompt id: first 16 hex digits of sha256 of the normalised prompt."""
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()[:16]


def _last_assistant(value: Any, column: str, row: int, source: str) -> str:
    """A response given as a string, or as a message list (UltraFeedback-binarized layout)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and value:
        for msg in reversed(value):
            if isinstance(msg, dict) and msg.get("role") == "assistant":
                return str(msg.get("content") or "")
    raise StageInputError(f"{source}: column {column!r} row {row}: expected a string or a message list with an assistant turn")


def _prompt_of(row: dict[str, Any], i: int, source: str) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for key in ("chosen", "messages"):
        msgs = row.get(key)
        if isinstance(msgs, list | tuple):
            for msg in msgs:
                if isinstance(msg, dict) and msg.get("role") == "user":
                    return str(msg.get("content") or "")
    raise StageInputError(f"{source}: row {i}: no 'prompt' column and no user turn in 'chosen'")


def load_source(source: str) -> list[dict[str, Any]]:
    """Rows of a local Parquet/JSONL file (or a Hugging Face dataset name when online)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".parquet":
            return pq.read_table(path).to_pylist()
        if path.suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".json" and text.lstrip().startswith("["):
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        raise StageInputError(f"{path}: unsupported file type {path.suffix!r}; give .parquet, .jsonl or .json")
    if path.exists() or "/" not in source or source.startswith((".", "/")):
        raise StageInputError(f"{source}: no such data file")
    try:
        import datasets
    except ImportError:
        raise StageInputError(f"{source}: not a local file; loading a hub dataset needs `pip install datasets`") from None
    name, _, split = source.partition(":")
    return datasets.load_dataset(name, split=split or "train").to_list()


def _resolve_size(size: float, total: int, what: str) -> int:
    if size < 1:
        return int(round(size * total))
    if size != int(size):
        raise StageInputError(f"{what}={size}: give a whole count (>= 1) or a fraction (< 1)")
    return int(size)


def split_rows(rows: list[dict[str, Any]], cfg: SPAConfig, source: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Normalise, deduplicate and split the rows; returns the splits and the counts report."""
    clean: list[dict[str, str]] = []
    seen: set[str] = set()
    report = {"rows_in": len(rows), "empty_prompts": 0, "duplicate_prompts": 0, "unusable_pairs": 0}
    for i, row in enumerate(rows):
        prompt = _prompt_of(row, i, source)
        if not prompt.strip():
            report["empty_prompts"] += 1
            continue
        chosen = _last_assistant(row.get("chosen"), "chosen", i, source)
        rejected = _last_assistant(row.get("rejected"), "rejected", i, source)
        key = prompt_hash(prompt)
        if key in seen:
            report["duplicate_prompts"] += 1
            continue
        seen.add(key)
        usable = bool(chosen.strip()) and bool(rejected.strip()) and chosen != rejected
        report["unusable_pairs"] += not usable
        pid = str(row["prompt_id"]) if row.get("prompt_id") else key
        clean.append({"prompt_id": pid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "_pair_ok": usable})
    total = len(clean)
    rng = np.random.default_rng(cfg.data.shuffle_seed)
    order = rng.permutation(total)
    clean = [clean[i] for i in order]
    # pairs for the seed and held-out sets must be usable; prompt sets only need the prompt
    pairs = [r for r in clean if r["_pair_ok"]]
    n_seed = _resolve_size(cfg.data.seed_size, total, "data.seed_size")
    n_held = _resolve_size(cfg.data.heldout_size, total, "data.heldout_size")
    n_prompts = [_resolve_size(s, total, f"data.prompt_sizes[{k}]") for k, s in enumerate(cfg.data.prompt_sizes[: cfg.iterations])]
    need_pairs = n_seed + n_held
    if len(pairs) < need_pairs:
        raise StageInputError(f"{source}: {len(pairs)} usable gold pairs, but seed ({n_seed}) + held-out ({n_held}) need {need_pairs}")
    seed_rows, held_rows = pairs[:n_seed], pairs[n_seed:need_pairs]
    used = {r["prompt_id"] for r in seed_rows + held_rows}
    rest = [r for r in clean if r["prompt_id"] not in used]
    if len(rest) < sum(n_prompts):
        raise StageInputError(
            f"{source}: {total} distinct prompts; seed {n_seed} + held-out {n_held} + prompt sets {n_prompts} "
            f"need {need_pairs + sum(n_prompts)}"
        )
    splits = {"seed": seed_rows, "heldout": held_rows}
    start = 0
    for t, n in enumerate(n_prompts, start=1):
        splits[f"prompts_{t}"] = rest[start : start + n]
        start += n
    report.update({"distinct_prompts": total, **{k: len(v) for k, v in splits.items()}})
    return splits, report


def _pairs_table(rows: list[dict]) -> pa.Table:
    return pa.table({k: [r[k] for r in rows] for k in ("prompt_id", "prompt", "chosen", "rejected")})


def _prompts_table(rows: list[dict]) -> pa.Table:
    return pa.table({k: [r[k] for r in rows] for k in ("prompt_id", "prompt")})


def run(cfg: SPAConfig, force: bool = False, echo=print) -> StageResult:
    """Write ``data/seed.parquet``, ``data/prompts_<t>.parquet`` and ``data/heldout.parquet``."""
    layout = RunLayout(Path(cfg.run_dir))
    if not cfg.data.source:
        raise StageInputError("data.source is not set: give a Parquet/JSONL file of preference pairs")
    source = Path(cfg.data.source)
    outputs = [layout.seed, layout.heldout] + [layout.prompts(t) for t in range(1, cfg.iterations + 1)]

    def body() -> dict[str, Any]:
        rows = load_source(cfg.data.source)
        splits, report = split_rows(rows, cfg, cfg.data.source)
        write_table(_pairs_table(splits["seed"]), layout.seed, "seed")
        write_table(_pairs_table(splits["heldout"]), layout.heldout, "heldout")
        for t in range(1, cfg.iterations + 1):
            write_table(_prompts_table(splits[f"prompts_{t}"]), layout.prompts(t), "prompts")
        if report["duplicate_prompts"] or report["empty_prompts"]:
            echo(f"[prepare] dropped {report['duplicate_prompts']} duplicate and {report['empty_prompts']} empty prompts")
        return report

    inputs = [source] if source.exists() else []
    return run_stage(cfg, "prepare", inputs, ["data", "iterations"], outputs, body,
                     extra_key={"source": cfg.data.source}, force=force, echo=echo)
