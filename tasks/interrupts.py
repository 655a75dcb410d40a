"""Ctrl-C (SIGINT) and SIGTERM under ``spa run``, ``spa expand`` and ``spa demo``: stop in seconds, in one line.

Left to itself, an interrupted flow stops Prefect's temporary API server first; the flow engine then reports its
crash to the server that is gone and retries for about two minutes, printing hundreds of lines (httpx
``ConnectError`` tracebacks), and the run's state stays ``Running``. Here, in this order:

1. the running stage's processes (the stage command, its torchrun workers, a vLLM engine) are stopped:
   SIGTERM, then SIGKILL after a few seconds; the temporary server's process is spared;
2. the flow run and its unfinished task runs are set ``Cancelled`` while the API is still up (a user's own
   server, ``PREFECT_API_URL``, or the temporary one), within a few seconds or not at all;
3. the temporary server is stopped;
4. one line on the terminal says what was interrupted and how to resume, and the process exits 130 (SIGINT)
   or 143 (SIGTERM) without running Prefect's exit hooks.

A second signal while this runs exits at once. No artifact is left half-written either way: every artifact
is written to a temporary name and renamed (``spa.run.artifacts``), and a rerun skips the finished stages.

Prefect's flow engine installs its own SIGTERM handler when a flow starts, so the flows re-install these
handlers inside the flow run (:func:`watching_flow_run`); outside a command that called :func:`arm` (a
deployment's worker), that is a no-op and Prefect's own cancellation applies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
CHILD_GRACE_S = 3.0  # SIGTERM to SIGKILL, for the stage's processes
API_TIMEOUT_S = 5.0  # the most the cancelled state may take to reach the API


@dataclass
class _Watch:
    resume: str  # the command that resumes the run
    flow_run_id: Any = None
    stages: list[str] = field(default_factory=list)  # the stages running now (shards run side by side)
    stopping: bool = False


_watch: _Watch | None = None


def arm(resume: str) -> None:
    """Handle SIGINT and SIGTERM in this process from now on (the CLI, before its flow starts); ``resume`` is
    the command the closing line tells the user to run."""
    global _watch
    _watch = _Watch(resume)
    _install()


def disarm() -> None:
    """Back to Python's default handlers (tests, and commands that run more than one flow in a process)."""
    global _watch
    _watch = None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _install() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in EXIT_CODES:
            signal.signal(sig, _handle)


@contextlib.contextmanager
def watching_flow_run() -> Iterator[None]:
    """Inside a flow run: put these handlers back over Prefect's and remember the flow run, to cancel it on a
    signal. Outside an armed command, nothing changes."""
    if _watch is None:
        yield
        return
    from prefect.runtime import flow_run

    _watch.flow_run_id = flow_run.id
    _install()
    try:
        yield
    finally:
        if _watch is not None:
            _watch.flow_run_id = None  # a finished flow run is never marked cancelled afterwards


@contextlib.contextmanager
def running(stage: str) -> Iterator[None]:
    """Name ``stage`` in the closing line if a signal comes while it runs."""
    if _watch is None:
        yield
        return
    _watch.stages.append(stage)
    try:
        yield
    finally:
        if _watch is not None and stage in _watch.stages:
            _watch.stages.remove(stage)


def _say(text: str) -> None:
    try:
        os.write(sys.__stderr__.fileno() if sys.__stderr__ else 2, text.encode())
    except OSError:
        pass


def _handle(signum: int, frame: Any) -> None:  # noqa: ARG001 - the signal module's signature
    code = EXIT_CODES.get(signum, 128 + signum)
    watch = _watch or _Watch("the same command")
    if watch.stopping:  # a second signal: out now (atomic writes leave nothing half-written)
        os._exit(code)
    watch.stopping = True
    where = f" during {', '.join(watch.stages)}" if watch.stages else ""
    _say(f"{NAMES.get(signum, f'signal {signum}')}: stopping{where} ... ")
    server = temporary_server_pids()
    stop_processes(child_processes(exclude=server))
    cancelled = mark_cancelled(watch.flow_run_id, f"interrupted ({NAMES.get(signum, signum)})")
    stop_temporary_server()
    state = "; the flow run is marked cancelled" if cancelled else ""
    _say(f"stopped{state}. Finished stages are kept; resume with: {watch.resume}\n")
    for handler in logging.getLogger().handlers + logging.getLogger("spa").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


def temporary_server_pids() -> set[int]:
    """The processes of the temporary Prefect API servers this process started: ours
    (``spa_tasks.temporary_server``) and any Prefect started itself. None with a user's ``PREFECT_API_URL``."""
    from spa_tasks import temporary_server

    pids = temporary_server.running_pids()
    if "prefect.server.api.server" not in sys.modules:
        return pids
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
        proc = getattr(server, "server_process", None)
        if proc is not None:
            pids.add(proc.pid)
    return pids


def child_processes(exclude: set[int] = frozenset()) -> list[Any]:
    """This process's descendants (``psutil.Process``), without the processes in ``exclude`` and theirs."""
    import psutil

    me = psutil.Process()
    spared = set(exclude)
    for pid in exclude:
        with contextlib.suppress(psutil.Error):
            spared |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    return [p for p in me.children(recursive=True) if p.pid not in spared]


def stop_processes(procs: list[Any], grace_s: float = CHILD_GRACE_S) -> None:
    """SIGTERM to each, SIGKILL to those still alive after ``grace_s`` seconds."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def mark_cancelled(flow_run_id: Any, message: str, timeout_s: float = API_TIMEOUT_S) -> bool:
    """Set the flow run and its unfinished task runs ``Cancelled`` through the API, within ``timeout_s`` seconds
    (in a thread: an API that does not answer costs no more than that). True when the flow run's state was set."""
    if flow_run_id is None:
        return False
    done = threading.Event()

    def cancel() -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            TaskRunFilter,
            TaskRunFilterState,
            TaskRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.states import Cancelled

        with contextlib.suppress(Exception), get_client(sync_client=True) as client:
            unfinished = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
                any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])))
            for task_run in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                                  task_run_filter=unfinished):
                client.set_task_run_state(task_run.id, Cancelled(message=message), force=True)
            client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
            done.set()

    thread = threading.Thread(target=cancel, name="spa-cancel-flow-run", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return done.is_set()


def stop_temporary_server() -> None:
    """Stop the temporary Prefect API servers this process started (a user's own server is left alone)."""
    from spa_tasks import temporary_server

    temporary_server.stop_all()
    if "prefect.server.api.server" not in sys.modules:
        return
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
        with contextlib.suppress(Exception):
            proc = getattr(server, "server_process", None)
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=CHILD_GRACE_S)
                except Exception:  # noqa: BLE001
                    proc.kill()
