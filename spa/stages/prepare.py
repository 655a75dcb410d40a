"""``spa prepare``: split preference data into the seed D_0, prompt sets X_1..X_T and held-out gold pairs.

Prompt sets are disjoint from each other and from the seed (docs/algorithm.md, iteration step 1)
by a hash of the normalised prompt; duplicates and empty prompts are dropped and counted, and so are rows too
long for the context (``data.overlong``, measured with the model's tokenizer on the rows the splits draw).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spa.config import PI_INIT_UNPAIRED, SPAConfig
from spa.data.overlong import Overlong, tokenizer_digest
from spa.data.sources import Source, iter_source, prompt_hash, resolve_source
from spa.data.sources import load_source as load_source  # re-exported: the readers live in sources.py
from spa.errors import StageInputError
from spa.run.artifacts import atomic_path, conform, write_table
from spa.run.layout import RunLayout
from spa.run.manifest import Stage
from spa.run.stage_runner import StageResult, run_stage
from spa.schemas import PAIRS_WRITTEN, PROMPTS

SECTIONS = ["data", "iterations"]  # config this stage's resume key covers

def _last_assistant(record: dict[str, Any], column: str, row: int, source: Source | str) -> str:
    """A response given as a string, or as a message list (UltraFeedback-binarized layout)."""
    value = record.get(column)
    if isinstance(value, str):
        return value
    if column not in record:
        raise StageInputError(f"{source}: row {row} has no column {column!r} (its columns: {', '.join(record)}); "
                              "a preference source needs 'chosen' and 'rejected' beside the prompt")
    if value is None:
        raise StageInputError(f"{source}: column {column!r} row {row}: the value is null")
    if isinstance(value, list | tuple) and value:
        for msg in reversed(value):
            if isinstance(msg, dict) and msg.get("role") == "assistant":
                return str(msg.get("content") or "")
    raise StageInputError(f"{source}: column {column!r} row {row}: expected a string or a message list with an "
                          f"assistant turn, got {type(value).__name__}")


def _prompt_of(row: dict[str, Any], i: int, source: Source | str) -> str:
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    for key in ("chosen", "messages"):
        msgs = row.get(key)
        if isinstance(msgs, list | tuple):
            for msg in msgs:
                if isinstance(msg, dict) and msg.get("role") == "user":
                    return str(msg.get("content") or "")
    raise StageInputError(f"{source}: row {i}: no 'prompt' column and no user turn in 'chosen'")


def _resolve_size(size: float, total: int, what: str) -> int:
    if size < 1:
        return int(round(size * total))
    if size != int(size):
        raise StageInputError(f"{what}={size}: give a whole count (>= 1) or a fraction (< 1)")
    return int(size)


def _u64(hex16: str) -> int:
    return int(hex16, 16)


@dataclass
class SourceIndex:
    """Pass 1 over the source: per row only small numbers (no texts), so memory stays ~20 bytes per row."""

    keys: np.ndarray  # uint64 normalised-prompt hash; 0 for an empty prompt
    usable: np.ndarray  # bool: chosen and rejected present and different
    id_hashes: np.ndarray  # uint64 hash of the row's prompt_id (given, or the prompt hash)
    empty: np.ndarray  # bool


def _row_record(row: dict[str, Any], i: int, source: Source | str) -> tuple[str, str, str, str] | None:
    """(prompt_id, prompt, chosen, rejected) of one source row, or None for an empty prompt."""
    prompt = _prompt_of(row, i, source)
    if not prompt.strip():
        return None
    chosen = _last_assistant(row, "chosen", i, source)
    rejected = _last_assistant(row, "rejected", i, source)
    pid = str(row["prompt_id"]) if row.get("prompt_id") else prompt_hash(prompt)
    return pid, prompt, chosen, rejected


def index_source(source: Source | str, progress: bool = False) -> SourceIndex:
    """Pass 1: hash every row's normalised prompt and note whether its pair is usable."""
    from tqdm.auto import tqdm

    keys, usable, ids, empty = [], [], [], []
    i = 0
    with tqdm(desc="prepare (index)", unit="row", disable=not progress) as bar:
        for batch in iter_source(source):
            k, u, d, e = (np.zeros(len(batch), np.uint64), np.zeros(len(batch), bool), np.zeros(len(batch), np.uint64),
                          np.zeros(len(batch), bool))
            for j, row in enumerate(batch):
                rec = _row_record(row, i + j, source)
                if rec is None:
                    e[j] = True
                    continue
                pid, prompt, chosen, rejected = rec
                k[j] = _u64(prompt_hash(prompt)) or 1  # 0 marks an empty prompt
                u[j] = bool(chosen.strip()) and bool(rejected.strip()) and chosen != rejected
                d[j] = _u64(hashlib.sha256(pid.encode("utf-8")).hexdigest()[:16])
            keys.append(k), usable.append(u), ids.append(d), empty.append(e)
            i += len(batch)
            bar.update(len(batch))
    if not i:
        raise StageInputError(f"{source}: no rows; give a source of preference pairs (docs/usage.md, \"Data sources\")")
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return SourceIndex(cat(keys, np.uint64), cat(usable, bool), cat(ids, np.uint64), cat(empty, bool))


SEED, HELDOUT = -2, -3  # split codes besides prompt set t (1..T); -1: unused


def assign_splits(index: SourceIndex, cfg: SPAConfig, source: Source | str, over: Overlong | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Deduplicate (first occurrence of each normalised prompt wins), shuffle with ``data.shuffle_seed``, and
    assign every source row a split: returns ``(split code per row, rank within seed/held-out, report)``.
    Rows ``over`` found too long for a role are passed over for it (the next rows in the shuffle take their place)."""
    rows_in = len(index.keys)
    nonempty = np.flatnonzero(~index.empty)
    _, first = np.unique(index.keys[nonempty], return_index=True)  # index of each key's first occurrence
    distinct = np.sort(nonempty[first])  # source order of first occurrences
    report = {"rows_in": rows_in, "empty_prompts": int(index.empty.sum()),
              "duplicate_prompts": int(len(nonempty) - len(distinct)),
              "unusable_pairs": int((~index.usable[distinct]).sum())}
    ids = index.id_hashes[distinct]
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():  # name the earliest row whose prompt_id another prompt also has
        first = int(np.flatnonzero(np.isin(ids, uniq[counts > 1]))[0])
        second = int(np.flatnonzero(ids == ids[first])[1])
        raise StageInputError(f"{source}: rows {distinct[first]} and {distinct[second]} have different prompts "
                              "but the same prompt_id")
    total = len(distinct)
    order = distinct[np.random.default_rng(cfg.data.shuffle_seed).permutation(total)]
    n_seed = _resolve_size(cfg.data.seed_size, total, "data.seed_size")
    n_held = _resolve_size(cfg.data.heldout_size, total, "data.heldout_size")
    n_prompts = [_resolve_size(s, total, f"data.prompt_sizes[{k}]") for k, s in enumerate(cfg.data.prompt_sizes[: cfg.iterations])]
    # pairs for the seed and held-out sets must be usable; prompt sets only need the prompt
    long_pair, long_prompt = (over.pair, over.prompt) if over is not None else (np.zeros(rows_in, bool),) * 2
    pairs = order[index.usable[order] & ~long_pair[order]]
    need_pairs = n_seed + n_held
    if len(pairs) < need_pairs:
        more = f" ({long_pair.sum()} more over the token limit)" if long_pair.any() else ""
        raise StageInputError(f"{source}: {len(pairs)} usable gold pairs{more}, but seed ({n_seed}) + held-out ({n_held}) "
                              f"need {need_pairs}")
    split = np.full(rows_in, -1, dtype=np.int32)
    rank = np.full(rows_in, -1, dtype=np.int64)
    split[pairs[:n_seed]], rank[pairs[:n_seed]] = SEED, np.arange(n_seed)
    split[pairs[n_seed:need_pairs]], rank[pairs[n_seed:need_pairs]] = HELDOUT, np.arange(n_held)
    rest = order[(split[order] == -1) & ~long_prompt[order]]
    if len(rest) < sum(n_prompts):
        more = f", {long_prompt.sum()} of them over the token limit" if long_prompt.any() else ""
        raise StageInputError(f"{source}: {total} distinct prompts{more}; seed {n_seed} + held-out {n_held} + prompt sets "
                              f"{n_prompts} need {need_pairs + sum(n_prompts)}")
    start = 0
    for t, n in enumerate(n_prompts, start=1):
        split[rest[start : start + n]] = t
        start += n
    report.update({"distinct_prompts": total, "seed": n_seed, "heldout": n_held,
                   **{f"prompts_{t}": n for t, n in enumerate(n_prompts, start=1)}})
    return split, rank, report


def _records(source: Source | str, rows: np.ndarray) -> Iterator[tuple[int, tuple[str, str, str, str]]]:
    """``(row, record)`` of the source rows where ``rows`` is true, streamed in source order."""
    start = 0
    for batch in iter_source(source) if rows.any() else ():
        for j in np.flatnonzero(rows[start : start + len(batch)]):
            yield start + int(j), _row_record(batch[j], start + int(j), source)  # type: ignore[misc]
        start += len(batch)


def draw_splits(index: SourceIndex, cfg: SPAConfig, source: Source | str) -> tuple[np.ndarray, np.ndarray, dict[str, Any], Overlong]:
    """Assign the splits, measure the drawn rows' token lengths, and redraw past the overlong ones until every
    drawn row fits its role (one more streamed pass per redraw, over the newly drawn rows only)."""
    split, rank, report = assign_splits(index, cfg, source)
    over = Overlong(cfg, source, len(split))
    while True:
        todo = over.todo(split > 0, (split == SEED) | (split == HELDOUT))
        if not over.measure(todo, _records(source, todo["prompt"] | todo["pair"])):
            break
        split, rank, report = assign_splits(index, cfg, source, over)
    report.update(over.report())
    return split, rank, report, over


def write_splits(source: Source | str, split: np.ndarray, rank: np.ndarray, layout: RunLayout, iterations: int,
                 progress: bool = False, flush_rows: int = 8192) -> None:
    """Pass 2: stream the source again and write every split (atomically, each file validated).

    Prompt sets keep the source order of their (randomly selected) rows and are written as they stream by;
    the seed and held-out pairs (sized in counts, small) are kept in their shuffled order.
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    from spa.schemas import KINDS

    pairs: dict[int, list[tuple[int, tuple]]] = {SEED: [], HELDOUT: []}
    with ExitStack() as stack:
        paths = {t: stack.enter_context(atomic_path(layout.prompts(t))) for t in range(1, iterations + 1)}
        writers = {t: stack.enter_context(pq.ParquetWriter(p, PROMPTS.schema)) for t, p in paths.items()}
        buffers: dict[int, list[tuple[str, str]]] = {t: [] for t in writers}
        written = dict.fromkeys(writers, 0)

        def flush(t: int) -> None:
            if buffers[t]:
                pid, prompt = zip(*buffers[t], strict=True)
                table = pa.table({"prompt_id": list(pid), "prompt": list(prompt)}, schema=PROMPTS.schema)
                conform(table, KINDS["prompts"], str(layout.prompts(t)), written[t])
                writers[t].write_table(table)
                written[t] += table.num_rows
                buffers[t] = []

        i = 0
        with tqdm(total=len(split), desc="prepare (write)", unit="row", disable=not progress) as bar:
            for batch in iter_source(source):
                for j, row in enumerate(batch):
                    code = int(split[i + j])
                    if code == -1:
                        continue
                    pid, prompt, chosen, rejected = _row_record(row, i + j, source)  # type: ignore[misc]
                    if code > 0:
                        buffers[code].append((pid, prompt))
                        if len(buffers[code]) >= flush_rows:
                            flush(code)
                    else:
                        pairs[code].append((int(rank[i + j]), (pid, prompt, chosen, rejected, i + j)))
                i += len(batch)
                bar.update(len(batch))
        for t in writers:
            flush(t)
        for code, target, kind in ((SEED, layout.seed, "seed"), (HELDOUT, layout.heldout, "heldout")):
            rows = [r for _, r in sorted(pairs[code])]
            table = pa.table({k: [r[n] for r in rows] for n, k in enumerate(PAIRS_WRITTEN.names)}, schema=PAIRS_WRITTEN)
            write_table(table, target, kind)


def _prepare(cfg: SPAConfig, source: Source, echo, unpaired_src: Source | None = None) -> dict[str, Any]:
    """Two streaming passes (bench P6): index and split on hashes only, then write the selected rows (and a third,
    over the drawn rows only, to measure their token lengths)."""
    index = index_source(source)
    split, rank, report, over = draw_splits(index, cfg, source)
    unpaired = None
    if unpaired_src is not None:  # read and checked whole before any file is written
        from spa.data.unpaired import plan_unpaired

        unpaired = plan_unpaired(unpaired_src, index.keys[split != -1], cfg.data.unpaired_size, cfg.data.shuffle_seed)
    del index
    write_splits(source, split, rank, RunLayout.of(cfg), cfg.iterations)
    if unpaired is not None:
        from spa.data.unpaired import write_unpaired

        write_unpaired(unpaired_src, unpaired, RunLayout.of(cfg).unpaired)
        report["unpaired"] = unpaired.report
        echo(f"[prepare] unpaired set: {unpaired.report['unpaired']} of {unpaired.report['rows_in']} rows "
             f"({unpaired.report['overlap_with_run_prompts']} share a prompt with the run's splits, "
             f"{unpaired.report['duplicate']} repeated, {unpaired.report['empty']} empty)")
    if report["duplicate_prompts"] or report["empty_prompts"]:
        echo(f"[prepare] dropped {report['duplicate_prompts']} duplicate and {report['empty_prompts']} empty prompts")
    if over.line():
        echo(over.line())
    return report | {"source": source.record()}


def run(cfg: SPAConfig, force: bool = False, echo=print) -> StageResult:
    """Write ``<run>/data/seed.parquet``, ``<run>/data/prompts_<t>.parquet`` and ``<run>/data/heldout.parquet``
    (and ``<run>/data/unpaired.parquet`` with ``data.unpaired_source``: :mod:`spa.data.unpaired`)."""
    layout = RunLayout.of(cfg)
    if not cfg.data.source:
        raise StageInputError("data.source is not set: give a file, a folder or a hub dataset id of preference pairs")
    # resolved once (a hub id pinned to one commit), so that every pass reads the same rows in the same order
    source = resolve_source(cfg.data.source, cfg.data.split, cfg.data.revision)
    # a local source is keyed by its content hash (a folder's files too); a hub dataset by repo, split and commit
    hub: dict[str, Any] = {"source_ref": source.ref()} if source.kind == "hub" else {}
    outputs = [layout.seed, layout.heldout] + [layout.prompts(t) for t in range(1, cfg.iterations + 1)]
    inputs = source.inputs()
    # pi_init's own answers as the unpaired set: the seed stage samples them (spa.stages.unpaired), nothing to read
    from_file = cfg.data.unpaired_source and cfg.data.unpaired_source != PI_INIT_UNPAIRED
    unpaired_src = resolve_source(cfg.data.unpaired_source) if from_file else None
    if unpaired_src is not None:
        outputs.append(layout.unpaired)
        inputs += unpaired_src.inputs()
        if unpaired_src.kind == "hub":
            hub["unpaired_ref"] = unpaired_src.ref()

    body = partial(_prepare, cfg, source, echo, unpaired_src)
    return run_stage(cfg, Stage.PREPARE.key(), inputs, SECTIONS, outputs, body,
                     extra_key={"source": cfg.data.source, **hub, "max_length": cfg.model.max_length,
                                "max_new_tokens": cfg.sample.max_new_tokens,
                                "tokenizer": tokenizer_digest(cfg.model.pi_init)}, force=force, echo=echo)
