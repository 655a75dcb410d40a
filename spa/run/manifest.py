"""``manifest.json``: one entry per finished stage, and the resume keys built from it.

A stage is up to date when its entry records the same input content hashes, the
same stage-config hash and code version, and every recorded output still exists
with its recorded hash (content hashes, never names). An
entry is written only after the stage's outputs are in place, so a failed or
killed attempt is never recorded as done (prefect#15658).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from spa.run.artifacts import file_sha256, write_text_atomic

_HASH_CACHE = ".spa_hashes.json"


class Stage(StrEnum):
    """The stages a manifest records; :meth:`key` is the one spelling of their entries' keys."""

    PREPARE = "prepare"
    TRAIN_RM = "train-rm"
    SEED = "seed"
    SAMPLE = "sample"
    JUDGE = "judge"
    TRAIN = "train"
    EVALUATE = "evaluate"
    UNPAIRED = "unpaired"  # SSPO's unpaired set sampled from pi_init (data.unpaired_source: pi_init)

    def key(self, t: int | None = None, shard: tuple[int, int] | None = None) -> str:
        """``prepare``, ``seed`` (also ``TRAIN`` at ``t = 0``), ``unpaired``, ``judge/2``, ``sample/1/shard-0-of-4``."""
        if self in (Stage.PREPARE, Stage.TRAIN_RM, Stage.SEED, Stage.UNPAIRED) or (self is Stage.TRAIN and t == 0):
            return Stage.SEED.value if self is Stage.TRAIN else self.value
        if t is None:
            raise ValueError(f"stage {self.value} needs an iteration")
        key = f"{self.value}/{t}"
        return key if shard is None else f"{key}/shard-{shard[0]}-of-{shard[1]}"


_MODEL_CARD = "README.md"


def hash_cache_dir() -> Path:
    """Where directory hashes are cached: ``$SPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/spa-pipeline/hashes``, else
    ``~/.cache/spa-pipeline/hashes``. Never inside the hashed folder: a user's model or data folder is not ours
    to write into (and may be read-only or shared)."""
    if os.environ.get("SPA_CACHE_DIR"):
        return Path(os.environ["SPA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spa-pipeline" / "hashes"


def dir_sha256(path: str | os.PathLike) -> str:
    """Content hash of a directory: its files' relative paths and contents (a top-level README.md, the
    model card, left out).

    File hashes are cached keyed by (size, mtime_ns), one cache file per folder in :func:`hash_cache_dir`, so a
    14 GB checkpoint is read once, not at every resume check.
    """
    path = Path(path)
    cache_file = hash_cache_dir() / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    digest = hashlib.sha256()
    fresh: dict[str, Any] = {}
    # the model card (README.md at the top) is metadata written after the weights (spa/run/model_card.py);
    # _HASH_CACHE: where earlier versions kept the cache, inside the folder
    files = (p for p in path.rglob("*") if p.is_file() and p.name != _HASH_CACHE
             and not (p.parent == path and p.name == _MODEL_CARD))
    for file in sorted(files):
        rel = file.relative_to(path).as_posix()
        st = file.stat()
        key = [st.st_size, st.st_mtime_ns]
        entry = cache.get(rel)
        file_hash = entry["sha256"] if entry and entry.get("key") == key else file_sha256(file)
        fresh[rel] = {"key": key, "sha256": file_hash}
        digest.update(rel.encode() + b"\0" + file_hash.encode() + b"\n")
    if fresh != cache:
        with contextlib.suppress(OSError):  # no writable cache: every check hashes again, nothing fails
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cache_file, json.dumps(fresh))
    return digest.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """Hash of a file or a directory's content."""
    path = Path(path)
    return dir_sha256(path) if path.is_dir() else file_sha256(path)


def code_version() -> str:
    import spa

    return spa.__version__


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "pyarrow"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class Manifest:
    """Read and update ``<run>/manifest.json`` (updates are locked and atomic)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def entries(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())["stages"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{self.path}: corrupt manifest ({exc}); move it away to rerun every stage") from exc

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries().get(key)

    def record(self, key: str, entry: dict[str, Any]) -> None:
        with _locked(self.path):
            stages = self.entries()
            stages[key] = entry
            write_text_atomic(self.path, json.dumps({"stages": stages}, indent=2, sort_keys=True))

    def forget(self, key: str) -> None:
        with _locked(self.path):
            stages = self.entries()
            if stages.pop(key, None) is not None:
                write_text_atomic(self.path, json.dumps({"stages": stages}, indent=2, sort_keys=True))


def stage_key(inputs: dict[str, str], config_hash: str) -> dict[str, Any]:
    """What must match for a finished stage to count as up to date."""
    return {"inputs": inputs, "config_hash": config_hash, "code_version": code_version()}


def _name(path: str | os.PathLike, root: Path | None) -> str:
    """Paths inside the run directory are recorded relative to it, so a moved run stays valid."""
    path = Path(path)
    if root is not None and path.is_absolute() == root.is_absolute() and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return str(path)


def hash_inputs(paths: Iterable[str | os.PathLike], root: Path | None = None) -> dict[str, str]:
    return {_name(p, root): content_hash(p) for p in paths}


def is_up_to_date(manifest: Manifest, key: str, expected: dict[str, Any]) -> bool:
    """True when ``key``'s entry matches ``expected`` and its outputs are intact."""
    entry = manifest.get(key)
    if not entry or any(entry.get(k) != v for k, v in expected.items()):
        return False
    for out, digest in entry.get("outputs", {}).items():
        path = manifest.path.parent / out  # an absolute ``out`` stays absolute
        if not path.exists() or content_hash(path) != digest:
            return False
    return True


def make_entry(expected: dict[str, Any], outputs: Iterable[str | os.PathLike], started: float,
               summary: dict[str, Any], root: Path | None = None) -> dict[str, Any]:
    return {
        **expected,
        "outputs": hash_inputs(outputs, root),
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": library_versions(),
        "summary": summary,
    }
