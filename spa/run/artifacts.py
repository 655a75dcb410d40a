"""Reading and writing the Parquet artifacts of the contract, safely.

Writes are atomic (temporary file in the target directory, fsync, rename, fsync
of the directory): a reader never sees half a file and a killed stage leaves no
partial artifact. Reads validate against :mod:`spa.schemas` and fail with an
:class:`ArtifactError` naming the file, the column and the first bad row.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spa.errors import ArtifactError
from spa.schemas import FINISH_REASONS, KINDS, ArtifactKind


def _kind(kind: str | ArtifactKind) -> ArtifactKind:
    if isinstance(kind, ArtifactKind):
        return kind
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {sorted(KINDS)}") from None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over ``target``.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_orphans(outputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove the temporaries a killed writer of ``outputs`` left behind (``.<name>.<random>.tmp`` files of
    :func:`atomic_path`, ``.<name>.tmp`` directories of a model save); other files are never touched. A
    stage calls this before it starts, so repeated kills do not pile up (a model's would be gigabytes)."""
    removed = []
    for out in map(Path, outputs):
        if not out.parent.is_dir():
            continue
        for orphan in [*out.parent.glob(f".{glob.escape(out.name)}.*.tmp"), out.parent / f".{out.name}.tmp"]:
            if orphan.is_dir():
                shutil.rmtree(orphan, ignore_errors=True)
            elif orphan.exists():
                orphan.unlink(missing_ok=True)
            else:
                continue
            removed.append(orphan)
    return removed


def write_text_atomic(target: str | os.PathLike, text: str) -> Path:
    """Write a small text file (JSON, YAML, Markdown) atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_table(table: pa.Table, target: str | os.PathLike, kind: str | ArtifactKind | None = None) -> Path:
    """Validate ``table`` against ``kind`` (when given) and write it atomically as Parquet."""
    target = Path(target)
    if kind is not None:
        table = conform(table, _kind(kind), str(target))
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)
    return target


def read_table(path: str | os.PathLike, kind: str | ArtifactKind, columns: list[str] | None = None) -> pa.Table:
    """Read a whole artifact and validate it; see :func:`iter_batches` for streaming."""
    path = Path(path)
    spec = _kind(kind)
    _require_file(path, spec)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable Parquet file ({exc}); rerun the stage that writes it") from exc
    table = conform(table, spec, str(path))
    return table.select(columns) if columns else table


def iter_batches(path: str | os.PathLike, kind: str | ArtifactKind, batch_size: int = 4096) -> Iterator[pa.Table]:
    """Stream a validated artifact in record batches; memory does not grow with the file.

    Uniqueness is checked across batches (a set of the unique column's values is kept).
    """
    path = Path(path)
    spec = _kind(kind)
    _require_file(path, spec)
    try:
        reader = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ArtifactError(f"{path}: not a readable Parquet file ({exc}); rerun the stage that writes it") from exc
    _check_columns(reader.schema_arrow, spec, str(path))
    seen: set[str] = set()
    offset = 0
    for batch in reader.iter_batches(batch_size=batch_size):
        table = conform(pa.Table.from_batches([batch]), spec, str(path), row_offset=offset, seen=seen)
        offset += table.num_rows
        yield table


def iter_chunks(
    path: str | os.PathLike, kind: str | ArtifactKind, chunk_rows: int, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, pa.Table]]:
    """Validated rows ``[start, stop)`` in chunks of exactly ``chunk_rows`` (the last may be shorter).

    Chunk boundaries fall at ``start + k*chunk_rows`` whatever the file's row groups, so work done
    per chunk is the same whether a file is processed whole or in chunk-aligned shards.
    Yields ``(first_row_index, table)``.
    """
    buffer: list[pa.Table] = []
    buffered = 0
    position = 0
    emitted = start
    for batch in iter_batches(path, kind, batch_size=max(chunk_rows, 1024)):
        lo, hi = position, position + batch.num_rows
        position = hi
        if hi <= start:
            continue
        if stop is not None and lo >= stop:
            break
        keep = batch.slice(max(0, start - lo), (min(hi, stop) if stop is not None else hi) - max(lo, start))
        buffer.append(keep)
        buffered += keep.num_rows
        while buffered >= chunk_rows:
            joined = pa.concat_tables(buffer)
            yield emitted, joined.slice(0, chunk_rows)
            emitted += chunk_rows
            rest = joined.slice(chunk_rows)
            buffer, buffered = ([rest] if rest.num_rows else []), rest.num_rows
    if buffered:
        yield emitted, pa.concat_tables(buffer)


def merge_parquet(parts: list[str | os.PathLike], target: str | os.PathLike, kind: str | ArtifactKind) -> int:
    """Concatenate validated parts, in order, into ``target`` atomically; returns the row count.

    Row group by row group, so the merge of chunk-aligned shards has the same row groups, and
    the same bytes, as the file an unsharded run writes.
    """
    spec = _kind(kind)
    rows = 0
    seen: set[str] = set()
    with atomic_path(target) as tmp:
        writer = None
        try:
            for part in parts:
                _require_file(Path(part), spec)
                pf = pq.ParquetFile(part)
                _check_columns(pf.schema_arrow, spec, str(part))
                for i in range(pf.metadata.num_row_groups):
                    group = conform(pf.read_row_group(i), spec, str(part), row_offset=rows, seen=seen)
                    if writer is None:
                        schema = _canonical(group.schema)
                        writer = pq.ParquetWriter(tmp, schema)
                    writer.write_table(group.cast(schema))
                    rows += group.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ArtifactError(f"{target}: no rows in the {len(parts)} parts to merge")
    return rows


def _canonical_type(t: pa.DataType) -> pa.DataType:
    return pa.list_(_canonical_type(t.value_type)) if pa.types.is_list(t) else t


def _canonical(schema: pa.Schema) -> pa.Schema:
    """List children (at every depth) named ``item`` as pyarrow writes them (Parquet reads them back as
    ``element``)."""
    return pa.schema([pa.field(f.name, _canonical_type(f.type), f.nullable) for f in schema])


def num_rows(path: str | os.PathLike) -> int:
    """Row count from the Parquet footer, without reading the data."""
    return pq.ParquetFile(path).metadata.num_rows


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Content hash of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _require_file(path: Path, spec: ArtifactKind) -> None:
    if not path.is_file():
        raise ArtifactError(f"{path}: the {spec.name} artifact does not exist; run the stage that writes it first")


def _check_columns(schema: pa.Schema, spec: ArtifactKind, where: str) -> None:
    for fld in spec.schema:
        if fld.name not in schema.names:
            raise ArtifactError(
                f"{where}: missing column {fld.name!r} required for {spec.name} (has: {', '.join(schema.names)})"
            )
        have = schema.field(fld.name).type
        if not _castable(have, fld.type):
            raise ArtifactError(f"{where}: column {fld.name!r} has type {have}, expected {fld.type}")


def _castable(have: pa.DataType, want: pa.DataType) -> bool:
    if have == want:
        return True
    families = (
        (pa.types.is_string, pa.types.is_large_string),
        (pa.types.is_integer,),
        (pa.types.is_floating,),
    )
    for fam in families:
        if any(f(have) for f in fam) and any(f(want) for f in fam):
            return True
    if pa.types.is_integer(have) and pa.types.is_floating(want):
        return True
    if (pa.types.is_list(have) or pa.types.is_large_list(have)) and pa.types.is_list(want):
        return _castable(have.value_type, want.value_type)
    return False


def conform(
    table: pa.Table,
    spec: ArtifactKind,
    where: str,
    row_offset: int = 0,
    seen: set[str] | None = None,
) -> pa.Table:
    """Check ``table`` against ``spec`` and cast its contract columns to the contract types.

    Raises :class:`ArtifactError` with the file, column and first bad row (0-based).
    """
    _check_columns(table.schema, spec, where)
    for fld in spec.schema:
        col = table.column(fld.name)
        if col.type != fld.type:
            try:
                col = col.cast(fld.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ArtifactError(f"{where}: column {fld.name!r} cannot be read as {fld.type}: {exc}") from exc
            table = table.set_column(table.schema.get_field_index(fld.name), fld.name, col)
    for name in spec.nonempty:
        col = table.column(name)
        bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_trim_whitespace(col), ""))
        _raise_first(bad, where, name, row_offset, "is null or empty")
    for left, right in spec.distinct:
        same = pc.equal(table.column(left), table.column(right))
        _raise_first(same, where, left, row_offset, f"equals {right!r} (a pair needs two different responses)")
    if spec.same_length:
        lengths = [pc.list_value_length(table.column(c)) for c in spec.same_length]
        for name, lens in zip(spec.same_length[1:], lengths[1:], strict=True):
            _raise_first(pc.not_equal(lens, lengths[0]), where, name, row_offset, f"has a different length than {spec.same_length[0]!r}")
    if "finish_reasons" in spec.schema.names:
        flat = pc.list_flatten(table.column("finish_reasons"))
        if len(flat) and not pc.all(pc.is_in(flat, value_set=pa.array(sorted(FINISH_REASONS)))).as_py():
            bad_rows = [i for i, v in enumerate(table.column("finish_reasons").to_pylist()) if set(v or []) - FINISH_REASONS]
            raise ArtifactError(
                f"{where}: column 'finish_reasons' row {row_offset + bad_rows[0]}: values must be one of {sorted(FINISH_REASONS)}"
            )
    if "p_chosen" in spec.schema.names:
        p = table.column("p_chosen")
        low = pc.less(p, 0.5)
        if "flipped" in table.column_names:  # label-noise injection swapped the judged winner on purpose
            low = pc.and_kleene(low, pc.invert(pc.fill_null(table.column("flipped"), False)))
        bad = pc.or_kleene(pc.is_null(p), pc.or_kleene(low, pc.or_kleene(pc.less(p, 0.0), pc.greater(p, 1.0))))
        _raise_first(bad, where, "p_chosen", row_offset,
                     "must be in [0.5, 1] (chosen is the judged winner unless the row is 'flipped')")
    if spec.unique:
        values = table.column(spec.unique).to_pylist()
        seen = set() if seen is None else seen
        for i, value in enumerate(values):
            if value in seen:
                raise ArtifactError(f"{where}: column {spec.unique!r} row {row_offset + i}: duplicate value {value!r}")
            seen.add(value)
    return table.select(spec.schema.names + [n for n in table.schema.names if n not in spec.schema.names])


def _raise_first(mask: pa.ChunkedArray | pa.Array, where: str, column: str, row_offset: int, what: str) -> None:
    mask = pc.fill_null(mask, True)
    if pc.any(mask).as_py():
        first = pc.index(mask, True).as_py()
        raise ArtifactError(f"{where}: column {column!r} row {row_offset + first}: {what}")
