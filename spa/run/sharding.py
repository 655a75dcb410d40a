"""Splitting a stage's rows into shards that merge back into exactly the unsharded artifact.

Shards are contiguous runs of whole chunks (``chunk_rows`` rows): every chunk is
processed the same way (same batches, same seed) whether the file is done whole or
in shards, so the merged artifact equals the unsharded one.
"""

from __future__ import annotations

import math
from pathlib import Path


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard expects i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < N")
    return i, n


def shard_bounds(num_rows: int, shard: tuple[int, int] | None, chunk_rows: int) -> tuple[int, int]:
    """Row range ``[start, stop)`` of shard ``(i, N)``: chunks split as evenly as possible."""
    if shard is None:
        return 0, num_rows
    i, n = shard
    chunks = math.ceil(num_rows / chunk_rows)
    first = (chunks * i) // n
    last = (chunks * (i + 1)) // n
    return min(num_rows, first * chunk_rows), min(num_rows, last * chunk_rows)


def shard_path(final: Path, shard: tuple[int, int]) -> Path:
    """Where shard ``(i, N)`` of ``final`` is written: ``<dir>/shards/<stem>.<i>-of-<N>.parquet``."""
    i, n = shard
    return final.parent / "shards" / f"{final.stem}.{i:04d}-of-{n:04d}.parquet"

