"""Shared code of the data scripts: any ``datasets`` dataset -> the preference file ``spa prepare`` reads.

The output (Parquet or JSONL, by the output's suffix) has one row per source row with the columns of
``docs/artifacts.md`` (preference pairs): ``prompt`` (the user turn, a string), ``chosen`` and
``rejected`` (assistant responses, strings), and ``prompt_id`` when the source has one (``spa prepare``
hashes the normalised prompt otherwise). Messages lists (``[{"role": ..., "content": ...}, ...]``, the
UltraFeedback-binarized layout) become strings: the prompt is the first user turn, a response the last
assistant turn.

A row with empty ``chosen``/``rejected`` is a prompt without a gold pair: ``spa prepare`` uses it for prompt
sets only. With ``--tokenizer`` the scripts make such rows of the pairs that would not fit the model's
context (training refuses a pair longer than ``model.max_length``) and drop the prompts that leave no room
for ``max_new_tokens`` (sampling refuses those).

This folder is not a package: the scripts import this module from their own directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BATCH_ROWS = 1000
END_OF_TURN_MARGIN = 4  # tokens the chat template adds after a response (end-of-turn, newline); counted generously


class ConversionError(ValueError):
    """Bad input: the message is one line naming the source, column and row."""


def _messages(value: Any) -> list[dict] | None:
    if isinstance(value, list | tuple) and all(isinstance(m, dict) for m in value):
        return list(value)
    return None


def prompt_text(value: Any, column: str, row: int) -> str:
    """A prompt given as a string, or the first user turn of a message list."""
    if isinstance(value, str):
        return value
    for msg in _messages(value) or []:
        if msg.get("role") == "user":
            return str(msg.get("content") or "")
    raise ConversionError(f"column {column!r} row {row}: expected a string or a message list with a user turn, "
                          f"got {_describe(value)}")


def response_text(value: Any, column: str, row: int) -> str:
    """A response given as a string, or the last assistant turn of a message list."""
    if isinstance(value, str):
        return value
    for msg in reversed(_messages(value) or []):
        if msg.get("role") == "assistant":
            return str(msg.get("content") or "")
    raise ConversionError(f"column {column!r} row {row}: expected a string or a message list with an assistant "
                          f"turn, got {_describe(value)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


@dataclass(frozen=True)
class Columns:
    """Which source columns hold what; ``scores`` are numeric columns copied through as floats."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    prompt_id: str | None = None
    scores: tuple[str, ...] = ()

    def needed(self) -> list[str]:
        names = [self.prompt, self.chosen, self.rejected, *([self.prompt_id] if self.prompt_id else []), *self.scores]
        return list(dict.fromkeys(names))


def check_columns(available: Sequence[str], columns: Columns, where: str) -> None:
    missing = [c for c in columns.needed() if c not in available]
    if missing:
        raise ConversionError(f"{where}: missing column(s) {', '.join(map(repr, missing))} "
                              f"(the dataset has: {', '.join(available)})")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def load_split(source: str, split: str):
    """``split`` of a hub dataset, of a local copy (``save_to_disk`` folder, a folder of Parquet/JSON files as
    the hub stores them) or of one local Parquet/JSON(L)/CSV file (which is taken whole)."""
    try:
        import datasets
    except ImportError:
        raise ConversionError("these scripts need the datasets library: pip install datasets") from None
    datasets.disable_progress_bars()  # stderr keeps to the one line an error needs
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    try:
        if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ConversionError(f"{source}: no split {split!r} (it has: {', '.join(loaded)})")
                return loaded[split]
            return loaded  # one saved split
        if path.is_file():
            kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
            if path.suffix not in kinds:
                raise ConversionError(f"{source}: unsupported file type {path.suffix!r}; give .parquet, .jsonl, "
                                      ".json or .csv, a dataset folder, or a hub id")
            return datasets.load_dataset(kinds[path.suffix], data_files={"train": str(path)}, split="train")
        if not path.exists() and source.startswith((".", "/", "~")):
            raise ConversionError(f"{source}: no such file or folder")
        return datasets.load_dataset(str(path) if path.is_dir() else source, split=split)  # a folder, or a hub id
    except ConversionError:
        raise
    except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as exc:  # not found (offline: not
        # cached), unknown split, a file that does not parse
        raise ConversionError(f"{source} (split {split!r}): cannot load: {_one_line(exc)}") from None


class LengthBudget:
    """Token counts with the model's tokenizer and chat template, to keep rows the pipeline can take.

    A prompt needs ``max_length - max_new_tokens`` tokens of room (sampling), a pair
    ``prompt + response <= max_length`` (training). Counts render the prompt with the chat template and add
    ``END_OF_TURN_MARGIN`` to each response, so they err on the side of dropping.
    """

    def __init__(self, tokenizer: str, max_length: int, max_new_tokens: int) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as exc:
            raise ConversionError(f"{tokenizer}: cannot load a tokenizer: {_one_line(exc)}") from None
        if not getattr(self.tok, "chat_template", None):
            raise ConversionError(f"{tokenizer}: the tokenizer has no chat template")
        if max_new_tokens >= max_length:
            raise ConversionError(f"--max-new-tokens {max_new_tokens} leaves no room in --max-length {max_length}")
        self.max_length, self.max_new_tokens = max_length, max_new_tokens

    def _count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def verdicts(self, prompts: list[str], chosen: list[str], rejected: list[str]) -> list[str]:
        """Per row: ``ok``, ``pair_too_long`` (keep the prompt only) or ``prompt_too_long`` (drop the row)."""
        rendered = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
        n_prompt = self._count(rendered)
        n_resp = [max(a, b) + END_OF_TURN_MARGIN for a, b in zip(self._count(chosen), self._count(rejected),
                                                                   strict=True)]
        return ["prompt_too_long" if p > self.max_length - self.max_new_tokens
                else "pair_too_long" if p + r > self.max_length else "ok" for p, r in zip(n_prompt, n_resp, strict=True)]


@dataclass
class Counts:
    rows_in: int = 0
    rows_out: int = 0
    prompt_only: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)

    def line(self, output: Path) -> str:
        extra = [f"{n} {why.replace('_', ' ')} (kept as prompts only)" for why, n in self.prompt_only.items()]
        extra += [f"{n} {why.replace('_', ' ')} (dropped)" for why, n in self.dropped.items()]
        return f"wrote {self.rows_out} of {self.rows_in} rows to {output}" + (f": {', '.join(extra)}" if extra else "")


def convert_rows(dataset, columns: Columns, counts: Counts, budget: LengthBudget | None = None,
                 limit: int | None = None, where: str = "the dataset") -> Iterator[list[dict[str, Any]]]:
    """Batches of output records (``prompt_id``?, ``prompt``, ``chosen``, ``rejected``, scores...)."""
    check_columns(list(dataset.column_names), columns, where)
    try:
        yield from _convert(dataset, columns, counts, budget, limit)
    except ConversionError as exc:
        raise ConversionError(f"{where}: {exc}") from None


def _convert(dataset, columns: Columns, counts: Counts, budget: LengthBudget | None,
             limit: int | None) -> Iterator[list[dict[str, Any]]]:
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    dataset = dataset.select_columns(columns.needed())
    row = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        n = len(batch[columns.prompt])
        prompts = [prompt_text(v, columns.prompt, row + i) for i, v in enumerate(batch[columns.prompt])]
        chosen = [response_text(v, columns.chosen, row + i) for i, v in enumerate(batch[columns.chosen])]
        rejected = [response_text(v, columns.rejected, row + i) for i, v in enumerate(batch[columns.rejected])]
        verdicts = budget.verdicts(prompts, chosen, rejected) if budget else ["ok"] * n
        records = []
        for i in range(n):
            if verdicts[i] == "prompt_too_long":
                counts.dropped[verdicts[i]] = counts.dropped.get(verdicts[i], 0) + 1
                continue
            rec: dict[str, Any] = {}
            if columns.prompt_id:  # an empty id is left null: spa prepare then hashes the prompt
                pid = batch[columns.prompt_id][i]
                rec["prompt_id"] = None if pid is None or pid == "" else str(pid)
            rec |= {"prompt": prompts[i], "chosen": chosen[i], "rejected": rejected[i]}
            if verdicts[i] == "pair_too_long":
                rec["chosen"] = rec["rejected"] = ""
                counts.prompt_only[verdicts[i]] = counts.prompt_only.get(verdicts[i], 0) + 1
            for name in columns.scores:
                value = batch[name][i]
                rec[name] = None if value is None else float(value)
            records.append(rec)
        counts.rows_in += n
        counts.rows_out += len(records)
        row += n
        yield records


def write_records(batches: Iterable[list[dict[str, Any]]], output: Path, columns: Columns) -> None:
    """Write Parquet (``.parquet``) or JSONL (``.jsonl``) atomically: a temporary file beside it, then rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if output.suffix not in (".parquet", ".jsonl"):
        raise ConversionError(f"{output}: the output must end in .parquet or .jsonl")
    schema = pa.schema([*([("prompt_id", pa.string())] if columns.prompt_id else []),
                        *[(k, pa.string()) for k in ("prompt", "chosen", "rejected")],
                        *[(k, pa.float64()) for k in columns.scores]])
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if output.suffix == ".parquet":
            with pq.ParquetWriter(tmp, schema) as writer:
                for records in batches:
                    writer.write_table(pa.Table.from_pylist(records, schema=schema))
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                for records in batches:
                    fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def add_common_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    parser.add_argument("--split", default=default_split, help=f"split to convert (default {default_split}); "
                        "ignored for a single local file")
    parser.add_argument("--limit", type=int, default=None, help="convert only the first N rows")
    parser.add_argument("--tokenizer", default=None,
                        help="model (or tokenizer) folder: keep only rows the pipeline can take at --max-length "
                             "(pairs too long become prompt-only rows, prompts too long are dropped)")
    parser.add_argument("--max-length", type=int, default=1024, help="model.max_length (default 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=300, help="sample.max_new_tokens (default 300)")


def run(args: argparse.Namespace, columns_for: Callable[[list[str]], Columns]) -> int:
    """Load, convert and write; bad input is one line on stderr and exit code 2.

    ``columns_for`` gets the source's column names and returns the mapping (optional columns resolved).
    """
    try:
        if args.limit is not None and args.limit < 1:
            raise ConversionError(f"--limit {args.limit}: give a positive number of rows")
        output = Path(args.output)
        dataset = load_split(args.input, args.split)
        columns = columns_for(list(dataset.column_names))
        where = args.input if Path(args.input).is_file() else f"{args.input} (split {args.split!r})"
        check_columns(list(dataset.column_names), columns, where)  # before anything is written
        budget = LengthBudget(args.tokenizer, args.max_length, args.max_new_tokens) if args.tokenizer else None
        counts = Counts()
        rows = convert_rows(dataset, columns, counts, budget, args.limit, where)
        write_records(rows, output, columns)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(counts.line(output))
    return 0
