"""The temporary Prefect API server of ``spa run``, ``spa expand`` and ``spa demo`` when ``PREFECT_API_URL`` is unset.

Prefect starts such a server itself (its "ephemeral" mode), but in the command's process group: a Ctrl-C on the
terminal reaches it at the same moment as the flow, it shuts down first, and the flow can no longer record that
it was interrupted (it retries against the gone server for minutes). This one is the same server (Prefect's
``uvicorn prefect.server.api.server:create_app``, the same database under ``PREFECT_HOME``, bound to 127.0.0.1)
started in a session of its own, so only this process decides when it stops (``spa_tasks.interrupts``). On Linux
it also stops when this process dies, SIGKILL included (``PR_SET_PDEATHSIG``).

It must start before Prefect is imported: Prefect reads ``PREFECT_API_URL`` when its settings load.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_running: list[subprocess.Popen] = []


class ServerDidNotStart(RuntimeError):
    """The temporary server exited or did not answer in time."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:  # noqa: S310 - our own local server
            return resp.status == 200
    except OSError:
        return False


def start(host: str = "127.0.0.1", timeout_s: float | None = None) -> tuple[subprocess.Popen, str]:
    """Start Prefect's API server on a free port of ``host`` and wait until it answers; returns the process and the
    API URL. Raises :class:`ServerDidNotStart` with the server's last output when it does not come up."""
    timeout_s = timeout_s if timeout_s is not None else float(os.environ.get(STARTUP_TIMEOUT_ENV, "120"))
    spec = find_spec("prefect")
    assert spec is not None and spec.origin is not None, "Prefect is a dependency of spa-pipeline"
    port = _free_port(host)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"spa-prefect-server-{port}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(  # the command and environment Prefect's own temporary server uses
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", host, "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"},
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)  # noqa: PLW1509
    url = f"http://{host}:{port}/api"
    deadline = time.time() + timeout_s
    while not _healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            log.seek(0)
            tail = " | ".join(line.strip() for line in log.read().splitlines()[-3:])
            raise ServerDidNotStart(f"the temporary Prefect server did not start within {timeout_s:.0f}s "
                                    f"(raise {STARTUP_TIMEOUT_ENV}, or set PREFECT_API_URL to a running server)"
                                    + (f": {tail}" if tail else ""))
        time.sleep(0.2)
    log.close()
    Path(log.name).unlink(missing_ok=True)
    _running.append(proc)
    return proc, url


def stop(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop the server: SIGTERM, then SIGKILL after ``grace_s`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _running:
        _running.remove(proc)


def running_pids() -> set[int]:
    """The processes of the temporary servers this process runs now."""
    return {p.pid for p in _running if p.poll() is None}


def stop_all() -> None:
    for proc in list(_running):
        stop(proc)


@contextlib.contextmanager
def temporary_server(environ=os.environ) -> Iterator[str | None]:
    """A temporary server for the duration of the block, its URL in ``PREFECT_API_URL``; nothing (``None``) when
    ``PREFECT_API_URL`` names a server already."""
    if environ.get("PREFECT_API_URL"):
        yield None
        return
    proc, url = start()
    environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        drain_prefect_workers()
        environ.pop("PREFECT_API_URL", None)
        stop(proc)


def drain_prefect_workers(timeout_s: float = 10.0) -> None:
    """Send the logs and events Prefect still holds to the server before it stops (Prefect does this at exit,
    against a server that would be gone by then: "Error logging to API")."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout_s)
