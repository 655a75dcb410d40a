"""One flow per run directory at a time.

An exclusive ``flock`` on ``<run>/.flow.lock``: the kernel drops it when the holder
exits, even on SIGKILL, so a crashed flow never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from spa.errors import RunLocked


class RunLock:
    def __init__(self, run_dir: str | os.PathLike, holder: str):
        self.path = Path(run_dir) / ".flow.lock"
        self.holder = holder
        self._fh = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            info = fh.read().strip() or "{}"
            fh.close()
            try:
                who = json.loads(info)
                desc = f"{who.get('holder')} (pid {who.get('pid')}, since {who.get('since')})"
            except ValueError:
                desc = "another process"
            raise RunLocked(
                f"{self.path.parent}: the run directory is in use by {desc}; wait for it to finish or stop it, "
                "then rerun (finished stages are skipped)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"holder": self.holder, "pid": os.getpid(),
                             "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
