"""Splitting a stage's rows into shards that merge back into exactly the unsharded artifact.

Shards are contiguous runs of whole chunks (``chunk_rows`` rows): every chunk is
processed the same way (same batches, same seed) whether the file is done whole or
in shards, so the merged artifact equals the unsharded one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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



def shard_devices(index: int, group_size: int, visible: Sequence[str]) -> str:
    """``CUDA_VISIBLE_DEVICES`` of shard ``index`` when shards run side by side on one machine: its own group of
    ``group_size`` consecutive devices of ``visible`` (one engine: ``tensor_parallel_size x pipeline_parallel_size``
    GPUs). With more shards than groups the groups are reused in turn (those shards share GPUs); never a device
    outside ``visible``."""
    groups = len(visible) // group_size
    if groups == 0:
        raise ValueError(f"one engine needs {group_size} GPUs (sample.tensor_parallel_size x pipeline_parallel_size) "
                         f"but {len(visible)} are visible ({','.join(visible) or 'none'})")
    first = (index % groups) * group_size
    return ",".join(visible[first : first + group_size])


def visible_devices(env: Mapping[str, str]) -> list[str]:
    """The GPUs a process started with ``env`` may use: ``CUDA_VISIBLE_DEVICES``'s entries where it is set (indices,
    UUIDs or MIG ids, up to the first ``-1``), else every GPU torch sees (none without CUDA)."""
    if "CUDA_VISIBLE_DEVICES" in env:
        entries = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",")]
        return entries[: entries.index("-1")] if "-1" in entries else [d for d in entries if d]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
