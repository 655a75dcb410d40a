"""The run's config as the flow's tasks read it: parsed once per process while its file is unchanged."""

from __future__ import annotations

import functools
import os


def run_config(config: str):
    """The resolved config at ``config`` (the ``config.yaml`` the flow saved), parsed once per process; a changed
    file (its modification time or size) is parsed again."""
    path = os.path.abspath(config)
    stat = os.stat(path)
    return _parsed(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _parsed(path: str, mtime_ns: int, size: int):  # noqa: ARG001 - the file's stamp is part of the cache key
    from spa.config import load_config

    return load_config(path)
