"""Reading ``data.source``: a local file or folder, or a Hugging Face dataset id, as batches of row dicts.

What ``data.source`` may be (docs/usage.md, "Data sources"), tried in this order (a path that exists always wins):

- a Parquet or JSONL file (``.parquet``, ``.jsonl``, ``.json`` with one object a line) or a JSON array (``.json``);
- a CSV or TSV file (``.csv``, ``.tsv``; every column read as a string, empty cells as ``""``);
- a ``datasets`` ``save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` and ``data.split``);
- a folder of data files (Parquet, JSONL, CSV, ...), read by ``datasets`` as a local dataset, ``data.split``;
- a hub dataset id ``org/name`` with ``data.split`` (default ``train``) and ``data.revision`` (default ``main``),
  resolved once to a commit: streamed from the hub at that commit when the hub is reachable, otherwise (or with
  ``HF_HUB_OFFLINE=1``) read from that commit's snapshot in the local hub cache (where ``hf download --repo-type
  dataset`` and a non-streaming ``datasets.load_dataset`` put it).

Parquet and JSONL keep their own streaming readers: pyarrow's ``iter_batches`` holds one record batch at a time
(bench P6's memory bound), and reading JSONL line by line names the broken line and its column in one error
(tests/test_bad_inputs.py), which ``datasets``' JSON builder (a pyarrow block reader) cannot. Every other kind
goes through ``datasets``, streamed (``streaming=True``, or a memory-mapped ``load_from_disk``), in a fixed
order, so prepare's passes over the source see the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spa.errors import StageInputError
from spa.run.preflight import is_hub_dataset_id

_SPACE = re.compile(r"\s+")


def normalise_prompt(text: str) -> str:
    """Case- and whitespace-insensitive form used for disjointness and ids."""
    return _SPACE.sub(" ", text).strip().lower()


def prompt_hash(text: str) -> str:
    """Stable prompt id: first 16 hex digits of sha256 of the normalised prompt."""
    return hashlib.sha256(normalise_prompt(text).encode("utf-8")).hexdigest()[:16]


BATCH_ROWS = 4096  # rows per streamed batch of the source
FILE_KINDS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


@dataclass(frozen=True)
class Source:
    """A resolved ``data.source``: its kind and where its rows are read from."""

    given: str  # as the config names it (in every error message)
    kind: str  # parquet | jsonl | json_array | csv | tsv | saved | folder | hub
    location: str  # the local file or folder, a cached hub snapshot, or the repo id (streamed from the hub)
    split: str | None = None
    revision: str | None = None  # asked for (hub)
    commit: str | None = None  # resolved (hub)

    def __str__(self) -> str:
        return f"{self.given} (split {self.split})" if self.kind == "hub" else self.given

    def inputs(self) -> list[Path]:
        """Local paths whose content is the source (hashed into prepare's resume key); a hub source is its commit."""
        return [] if self.kind == "hub" else [Path(self.location)]

    def ref(self) -> dict[str, str | None]:
        """A hub source's identity: repo id, split, revision asked for, commit resolved."""
        return {"repo_id": self.given, "split": self.split, "revision": self.revision or "main", "commit": self.commit}

    def record(self) -> dict[str, Any]:
        """What prepare's summary says the source was."""
        if self.kind == "hub":
            where = "hub" if self.location == self.given else "local cache"
            return {"kind": "hub", **self.ref(), "read_from": where}
        return {"kind": self.kind, "path": self.given} | ({"split": self.split} if self.split else {})


def resolve_source(given: str, split: str | None = None, revision: str | None = None) -> Source:
    """Tell what ``given`` is (local paths first) and, for a hub id, pin its commit."""
    path = Path(given).expanduser()
    if path.exists() and revision:
        raise StageInputError(f"{given}: data.revision ({revision}) applies to a hub dataset id only; this is a "
                              "local path")
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise StageInputError(f"{path}: unsupported file type {path.suffix!r}; give .parquet, .jsonl, .json, .csv "
                                  "or .tsv, a save_to_disk folder, a folder of data files, or a hub dataset id")
        if path.suffix.lower() == ".json":
            with open(path, encoding="utf-8", errors="replace") as fh:
                kind = "json_array" if fh.read(4096).lstrip().startswith("[") else "jsonl"
        return Source(given, kind, str(path))
    if path.is_dir():
        saved = (path / "dataset_dict.json").exists() or (path / "state.json").exists()
        dict_like = not saved or (path / "dataset_dict.json").exists()
        return Source(given, "saved" if saved else "folder", str(path), split=(split or "train") if dict_like else None)
    if is_hub_dataset_id(given):
        return _resolve_hub(given, split or "train", revision)
    raise StageInputError(f"{given}: no such data file (nor a folder, nor a hub dataset id org/name)")


def _resolve_hub(repo: str, split: str, revision: str | None) -> Source:
    """Pin ``repo`` at ``revision`` to a commit: asked of the hub when it is reachable, else the local cache's."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    at = f"{repo}@{revision or 'main'}"
    unreachable = "offline (HF_HUB_OFFLINE)"
    if not constants.HF_HUB_OFFLINE:
        try:
            commit = HfApi().dataset_info(repo, revision=revision).sha
            return Source(repo, "hub", repo, split, revision, commit)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise StageInputError(f"{at}: no such dataset or revision on the Hugging Face hub "
                                  f"({_first_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - unreachable hub (connection, timeout, HTTP): fall back to the cache
            unreachable = f"the hub is unreachable ({_first_line(exc)})"
    try:
        snapshot = Path(snapshot_download(repo, repo_type="dataset", revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise StageInputError(f"{at}: not a local path, and as a hub dataset id not in the local cache "
                              f"({constants.HF_HUB_CACHE}) and {unreachable}; download it where the hub is "
                              "reachable (hf download --repo-type dataset), or give a local file") from None
    return Source(repo, "hub", str(snapshot), split, revision, snapshot.name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _loads(raw: bytes, source: Any, line: int | None = None) -> Any:
    """Parse JSON text; broken text is one error naming the file and the line."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StageInputError(f"{source}: {f'line {line}: ' if line else ''}not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise StageInputError(f"{source}: line {line or exc.lineno}, column {exc.colno}: not valid JSON "
                              f"({exc.msg.removesuffix(' at')})") from None


def _object(value: Any, source: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise StageInputError(f"{source}: {where}: expected a JSON object, got {type(value).__name__}")
    return value


def _parquet_batches(source: Source, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    """A Parquet file's rows in batches; an unreadable file (truncated, not Parquet) is one error naming it."""
    def unreadable(exc: Exception) -> StageInputError:
        return StageInputError(f"{source}: not a readable Parquet file ({_first_line(exc)})")

    try:
        batches = pq.ParquetFile(source.location).iter_batches(batch_size=batch_rows)
    except (pa.ArrowException, OSError) as exc:
        raise unreadable(exc) from None
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise unreadable(exc) from None
        if batch is None:
            return
        yield batch.to_pylist()


def _jsonl_batches(source: Source, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    with open(source.location, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                rows.append(_object(_loads(raw, source, number), source, f"line {number}"))
                if len(rows) == batch_rows:
                    yield rows
                    rows = []
    if rows:
        yield rows


def _json_array_batches(source: Source, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    """A JSON array file, loaded whole (small files: prompt batches), then batched."""
    everything = _loads(Path(source.location).read_bytes(), source)
    if not isinstance(everything, list):
        raise StageInputError(f"{source}: expected a JSON array of objects")
    everything = [_object(row, source, f"item {i}") for i, row in enumerate(everything)]
    for start in range(0, len(everything), batch_rows):
        yield everything[start : start + batch_rows]


def _open_dataset(source: Source) -> Any:
    """The ``datasets`` view of a CSV/TSV file, a saved folder, a folder of data files or a hub dataset."""
    import datasets

    if source.kind in ("csv", "tsv"):
        import csv

        delimiter = "," if source.kind == "csv" else "\t"
        with open(source.location, encoding="utf-8", errors="replace", newline="") as fh:
            header = next(csv.reader(fh, delimiter=delimiter), [])
        features = datasets.Features({name: datasets.Value("string") for name in header})  # "007" stays "007"
        return datasets.load_dataset("csv", data_files=source.location, split="train", streaming=True,
                                     delimiter=delimiter, keep_default_na=False, features=features)
    if source.kind == "saved":
        saved = datasets.load_from_disk(source.location)  # memory-mapped Arrow files: nothing is read whole
        if isinstance(saved, datasets.DatasetDict):
            if source.split not in saved:
                raise StageInputError(f"{source}: no split {source.split!r} (its splits: {', '.join(saved)}); set data.split")
            saved = saved[source.split]
        return saved
    revision = source.commit if source.kind == "hub" and source.location == source.given else None
    return datasets.load_dataset(source.location, split=source.split, revision=revision, streaming=True)


def _dataset_batches(source: Source, batch_rows: int) -> Iterator[list[dict[str, Any]]]:
    """Rows read through ``datasets``; any failure to read is one error naming the source."""
    try:
        for batch in _open_dataset(source).iter(batch_size=batch_rows):
            columns = list(batch)
            yield [dict(zip(columns, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    except StageInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets, pandas and pyarrow raise many types; all mean "unreadable"
        bad_split = re.match(r"Bad split: (.*)\. Available splits: \[(.*)\]", _first_line(exc))
        if bad_split:  # the one failure a user fixes in the config
            raise StageInputError(f"{source}: no split {bad_split[1]!r} (its splits: {bad_split[2]}); set data.split") from None
        raise StageInputError(f"{source}: cannot read it as a {source.kind} source ({_first_line(exc)})") from None


_READERS = {"parquet": _parquet_batches, "jsonl": _jsonl_batches, "json_array": _json_array_batches}


def iter_source(source: Source | str, batch_rows: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """The source's rows in batches, in the same order on every pass (memory does not grow with the source,
    except for a JSON array file, which is loaded whole)."""
    if isinstance(source, str):
        source = resolve_source(source)
    yield from _READERS.get(source.kind, _dataset_batches)(source, batch_rows or BATCH_ROWS)


def load_source(source: Source | str) -> list[dict[str, Any]]:
    """All rows of a source (small files: incoming prompt batches)."""
    return [row for batch in iter_source(source) for row in batch]
