"""What a run prints on the terminal, and where everything else goes.

``spa run`` and ``spa demo`` open a :func:`terminal_session`: the terminal gets one line when a stage starts
(the command the flow runs) and one when it ends (its key numbers), the flow's final state, lines that start
with ``error:``, at most one live progress bar (:func:`progress_bar`, only on a TTY) and the closing table
(:func:`say`). Everything else, library chatter
(weight-loading bars, trainer dicts, httpx and Prefect logs, warnings) and the stages' full summaries, goes
to ``<run_dir>/logs/spa.log``. ``verbose`` shows it on the terminal too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# a stage's own lines ("[sample/1] done in 0.3s: ...", "[demo] ..."), errors and the report's path
STORY = re.compile(r"^(\[(prepare|seed|sample|judge|train|train-rm|evaluate|report|expand|demo)\b[^\]]*\] |error: |report: )")
FLOW_TASK_LOGGER, FLOW_RUN_LOGGER = "prefect.task_runs", "prefect.flow_runs"  # the flows' loggers (by name)
PROGRESS_RELAY_ENV = "SPA_PROGRESS_RELAY"  # set for a stage process: send the bar's state to the flow, which draws it
RELAY_MARK = "::spa-progress:: "  # starts a relayed bar's state line (printable: str.splitlines keeps it whole)
FLOW_STAGE_ENV = "SPA_FLOW_STAGE"  # set for a stage a flow runs: the flow routes its output, the stage leaves it be
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s - %(message)s"
log = logging.getLogger("spa")


def is_story(line: str) -> bool:
    return bool(STORY.match(line))


class _Session:
    def __init__(self, out: TextIO, err: TextIO, logfile: TextIO, verbose: bool):
        self.out, self.err, self.logfile, self.verbose = out, err, logfile, verbose

    def to_log(self, text: str) -> None:
        text = text if text.endswith("\n") else text + "\n"
        if self.logfile.closed:  # a record after the session (Prefect's goodbye at exit, keep_handlers)
            with open(self.logfile.name, "a", encoding="utf-8") as fh:
                fh.write(text)
            return
        self.logfile.write(text)
        self.logfile.flush()

    def to_terminal(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()


_session: _Session | None = None


def in_session() -> bool:
    """Whether this process's output is routed already (a :func:`terminal_session` is open)."""
    return _session is not None


def say(text: str) -> None:
    """Print ``text`` on the terminal (and into the log) whatever it says: the closing table, the report's path."""
    if _session is None:
        print(text, flush=True)
        return
    _session.to_log(text)
    _session.to_terminal(text)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, iterable: Any = None) -> Any:
    """The live bar of long work (sampling, judging, training), drawn on the terminal only when it is a TTY
    and cleared when done; a disabled bar otherwise (nothing printed, nothing logged). In a stage process whose
    flow draws the bar (``PROGRESS_RELAY_ENV``), the bar's state goes to the flow instead (:class:`RelayBar`)."""
    from tqdm.auto import tqdm

    if enabled and os.environ.get(PROGRESS_RELAY_ENV):
        return RelayBar(total, desc, unit, iterable)

    target = _session.err if _session is not None else sys.stderr
    live = enabled and bool(getattr(target, "isatty", lambda: False)())
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=target, disable=not live, leave=False, dynamic_ncols=True)


class RelayBar:
    """A stage process's bar that its flow draws: the bar's state as one line on stdout (``RELAY_MARK`` + JSON) at
    most every half second and when it closes. The pipe to the flow is not a terminal, so the stage cannot draw
    it; the flow (:class:`RelayedBar`) draws one bar for it on its own terminal."""

    def __init__(self, total: int, desc: str, unit: str, iterable: Any = None, every: float = 0.5):
        self.total, self.desc, self.unit, self.iterable, self.every = total, desc, unit, iterable, every
        self.n, self.postfix, self._last = 0, "", 0.0
        self._emit(force=True)

    def _emit(self, force: bool = False, closed: bool = False) -> None:
        import json
        import time

        now = time.monotonic()
        if force or closed or now - self._last >= self.every:
            self._last = now
            state = {"desc": self.desc, "unit": self.unit, "total": self.total, "n": self.n, "postfix": self.postfix}
            sys.stdout.write(RELAY_MARK + json.dumps(state | ({"closed": True} if closed else {})) + "\n")
            sys.stdout.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit()

    def set_postfix(self, values: dict[str, Any], refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._emit(closed=True)

    def __enter__(self) -> RelayBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()


class RelayedBar:
    """The flow's side of :class:`RelayBar`: feed it a stage process's output lines; it draws their bar
    (:func:`progress_bar`: only on a TTY) and says which lines were bar states, to keep them out of the log."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.key: tuple | None = None
        self.n = 0

    def feed(self, line: str) -> bool:
        import json

        if not line.startswith(RELAY_MARK):
            return False
        try:
            state = json.loads(line[len(RELAY_MARK):])
        except ValueError:
            return True
        key = (state.get("desc"), state.get("total"))
        if self.bar is None or key != self.key:
            self.close()
            self.bar, self.key, self.n = progress_bar(int(state.get("total") or 0), str(state.get("desc")),
                                                      str(state.get("unit"))), key, 0
        self.bar.update(int(state.get("n", 0)) - self.n)
        self.n = int(state.get("n", 0))
        if state.get("postfix"):
            self.bar.set_postfix_str(state["postfix"], refresh=False)
        if state.get("closed"):
            self.close()
        return True

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None


class StoryStream(io.TextIOBase):
    """A stand-in for ``sys.stdout``/``sys.stderr``: every line into the log, story lines (or, verbose, all) on
    the terminal. A progress bar's redraws (``\\r``) keep only their last state."""

    def __init__(self, session: _Session, terminal: TextIO):
        self.session, self.terminal, self.buffer_ = session, terminal, ""

    def write(self, s: str) -> int:
        self.buffer_ += s
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        line = next((seg for seg in reversed(line.split("\r")) if seg.strip()), "")
        if not line.strip():
            return
        self.session.to_log(line)
        if self.session.verbose or is_story(line):
            self.terminal.write(line + "\n")
            self.terminal.flush()

    def flush(self) -> None:
        self.terminal.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.terminal.fileno()

    def close_buffer(self) -> None:
        if self.buffer_:
            self._line(self.buffer_)
            self.buffer_ = ""


class StoryHandler(logging.Handler):
    """A logging handler for the terminal's place: the formatted record into the log; its story lines (a stage
    process's output arrives as one record per line) or, verbose, the record on the terminal."""

    def __init__(self, session: _Session, level: int = logging.NOTSET):
        super().__init__(level)
        self.session = session
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.session.to_log(text)
            lines = [text] if self.session.verbose else terminal_lines(record)
            for line in lines:
                self.session.to_terminal(line)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def terminal_lines(record: logging.LogRecord) -> list[str]:
    """What the terminal shows of a log record: a stage's command as the flow starts it (the stage's start line,
    ``$ spa sample -c run.yaml -t 1``), the flow's final state, and story lines (a stage process's output
    arrives as one record per line)."""
    msg = record.getMessage()
    if record.name == FLOW_TASK_LOGGER and msg.startswith("$ "):
        return ["$ spa " + re.sub(r"^-m spa_tasks\.stage_cli ", "", msg[2:])]
    if record.name == FLOW_RUN_LOGGER and msg.startswith("Finished in state"):
        return [f"{getattr(record, 'flow_name', 'flow')}: {msg}"]
    return [line for line in msg.splitlines() if is_story(line)]


def _retarget_handlers(session: _Session, terminals: tuple[Any, ...]) -> list[tuple[logging.Logger, logging.Handler]]:
    """Take every handler that writes to the terminal off its logger, and give the root logger (and every
    logger that does not propagate but had one) a :class:`StoryHandler`; returns what was taken off."""
    swapped = []
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in terminals:
                lg.removeHandler(handler)
                swapped.append((lg, handler))
                if not lg.propagate and lg is not logging.getLogger():
                    lg.addHandler(StoryHandler(session, handler.level))
    logging.getLogger().addHandler(StoryHandler(session))
    return swapped


def _restore_handlers(swapped: list[tuple[logging.Logger, logging.Handler]], out: TextIO, err: TextIO) -> None:
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for handler in list(lg.handlers):
            if isinstance(handler, StoryHandler):
                lg.removeHandler(handler)
            elif isinstance(handler, logging.StreamHandler) and isinstance(handler.stream, StoryStream):
                handler.setStream(handler.stream.terminal)  # made during the session (a library imported late)
    for lg, handler in swapped:
        lg.addHandler(handler)


@contextlib.contextmanager
def terminal_session(run_dir: str | os.PathLike, verbose: bool = False, keep_handlers: bool = False) -> Iterator[Path]:
    """Route this process's output for a run in ``run_dir``; yields the log file's path. Import Prefect before
    entering: its console handler is then found and replaced. ``keep_handlers`` (a process that ends with the
    run) leaves the logging handlers routed to the log after the session: Prefect stops its temporary server
    at exit and says so."""
    global _session
    from spa.run.layout import RunLayout

    path = RunLayout(Path(run_dir)).log_file
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    env = {"TQDM_DISABLE": None if verbose else "1", "TRANSFORMERS_VERBOSITY": "info" if verbose else "warning"}
    previous = {k: os.environ.get(k) for k in env}
    with open(path, "a", encoding="utf-8") as logfile:
        session = _session = _Session(out, err, logfile, verbose)
        os.environ.update({k: v for k, v in env.items() if v is not None})  # library bars: none unless verbose
        swapped = _retarget_handlers(session, (out, err, sys.__stdout__, sys.__stderr__))
        spa_level = log.level
        log.setLevel(logging.INFO)  # the stages' full summaries and the trainer's log dicts, into the log
        logging.captureWarnings(True)
        sys.stdout, sys.stderr = StoryStream(session, out), StoryStream(session, err)
        try:
            yield path
        finally:
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, StoryStream):
                    stream.close_buffer()
            sys.stdout, sys.stderr = out, err
            logging.captureWarnings(False)
            log.setLevel(spa_level)
            if not keep_handlers:
                _restore_handlers(swapped, out, err)
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            _session = None


def run_relayed(cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` (a helper in another interpreter, e.g. vLLM's) with its output written to this process's
    ``sys.stderr``, so that a terminal session routes it like our own (into the log, the story on the
    terminal) instead of the child printing on the terminal itself. A failure raises
    ``subprocess.CalledProcessError`` carrying the output's last 2000 characters."""
    import codecs
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    tail = ""
    while chunk := os.read(proc.stdout.fileno(), 1 << 16):
        text = decode(chunk)
        sys.stderr.write(text)
        tail = (tail + text)[-2000:]
    proc.stdout.close()
    rc = proc.wait()
    if rc:
        raise subprocess.CalledProcessError(rc, cmd, output=tail)
