"""Ctrl-C and SIGTERM under ``spa run``: one line, exit 130/143 within seconds, the flow run cancelled in the
server's database, nothing left running, and a rerun that finishes with the artifacts of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import _output_hashes
from conftest import flow_config as _config

from spa.run.layout import RunLayout

SPA = str(Path(sys.executable).parent / "spa")


def _start(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """``spa <args>`` in a process group of its own (as a terminal runs a command); its output lines, timed."""
    proc = subprocess.Popen([SPA, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def _wait_for_stage(proc: subprocess.Popen, stage: str, timeout: float = 300) -> list[int]:
    """Wait until ``proc`` runs the stage command ``stage`` as a child process; the pids of all its descendants."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        kids = psutil.Process(proc.pid).children(recursive=True)
        for k in kids:
            try:
                if "spa_tasks.stage_cli" in k.cmdline() and stage in k.cmdline():
                    time.sleep(2)  # well inside the stage: its model loaded
                    return [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"{stage} never started")


def _flow_run_state(config: Path) -> str:
    """The state of the newest ``spa-pipeline`` flow run of ``config`` in the database under PREFECT_HOME."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=50)
    mine = [r for r in runs if r.parameters.get("config") == str(config.resolve())]
    assert mine, "no flow run of this config in the database"
    return mine[0].state.type.value


@pytest.mark.parametrize("sig, code, group", [
    (signal.SIGINT, 130, True),
    pytest.param(signal.SIGTERM, 143, False, marks=pytest.mark.slow),  # ~2 min more, the same path
], ids=["ctrl-c-to-the-terminal-group", "sigterm-to-the-command"])
def test_interrupted_run_ends_in_one_line_and_resumes(sig, code, group, full_run, tmp_path, tiny_model_dir,
                                                      prefs_file):
    cfg_ref, _, _ = full_run
    cfg, path = _config(tmp_path, tiny_model_dir, prefs_file, name="interrupted")
    lay = RunLayout.of(cfg)
    proc, lines = _start(["run", str(path)])
    descendants = _wait_for_stage(proc, "seed")
    sent = time.time()
    if group:  # Ctrl-C: the terminal signals the whole foreground process group
        os.killpg(proc.pid, sig)
    else:  # kill PID, a scheduler's SIGTERM
        proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    took = time.time() - sent
    time.sleep(0.5)  # the reader takes the last lines
    after = [line for t, line in lines if t >= sent and line.strip()]
    text = "\n".join(line for _, line in lines)
    assert rc == code, text[-3000:]
    assert took < 15, f"took {took:.1f}s to exit"
    assert 1 <= len(after) <= 3, after
    assert "Traceback" not in text and "ConnectError" not in text and "Error logging" not in text, text[-3000:]
    assert "during seed" in after[-1] and f"resume with: spa run {path}" in after[-1], after
    assert "marked cancelled" in after[-1], after
    alive = [p for p in descendants if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], "processes left running: " + str([psutil.Process(p).cmdline() for p in alive])
    assert not lay.model(0).exists()
    leftovers = [p for p in lay.root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []
    assert _flow_run_state(path) == "CANCELLED"

    res = subprocess.run([SPA, "run", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert _output_hashes(lay.root) == _output_hashes(Path(cfg_ref.run_dir))
    assert json.loads(lay.manifest.read_text())["stages"].keys() == \
        json.loads(RunLayout.of(cfg_ref).manifest.read_text())["stages"].keys()


def test_run_takes_set_overrides_and_refuses_a_bad_one(tmp_path, tiny_model_dir, prefs_file):
    _, path = _config(tmp_path, tiny_model_dir, prefs_file)
    res = subprocess.run([SPA, "run", str(path), "-s", "train.beta=-1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "beta" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # ~1.5 min: a real `prefect server start`, then a run interrupted in its seed stage
def test_ctrl_c_with_the_users_own_server_leaves_the_flow_run_cancelled(prefect_server, tmp_path, tiny_model_dir,
                                                                        prefs_file):
    _, path = _config(tmp_path, tiny_model_dir, prefs_file, name="own-server")
    proc, lines = _start(["run", str(path)], env=prefect_server)
    _wait_for_stage(proc, "seed")
    os.killpg(proc.pid, signal.SIGINT)  # the user's server runs elsewhere: the signal does not reach it
    assert proc.wait(timeout=60) == 130
    time.sleep(0.5)
    assert "marked cancelled" in lines[-1][1], lines[-3:]
    request = urllib.request.Request(f"{prefect_server['PREFECT_API_URL']}/flow_runs/filter", method="POST",
                                     data=json.dumps({"sort": "START_TIME_DESC", "limit": 10}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        runs = json.loads(resp.read())
    mine = [r for r in runs if r["parameters"].get("config") == str(path.resolve())]
    assert mine and mine[0]["state"]["type"] == "CANCELLED", [r["state"]["type"] for r in mine]


def _armed_script(body: str) -> subprocess.CompletedProcess:
    code = ("import os, signal, time\nfrom spa_tasks import interrupts\n"
            "interrupts.arm('spa run run.yaml')\n" + body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_a_signal_outside_any_stage_ends_in_one_line_with_the_resume_command():
    res = _armed_script("os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\nprint('not reached')")
    assert res.returncode == 143 and res.stdout == ""
    assert res.stderr.splitlines() == ["SIGTERM: stopping ... stopped. Finished stages are kept; resume with: "
                                       "spa run run.yaml"]


def test_a_second_ctrl_c_while_stopping_exits_at_once():
    """The first signal's clean-up is under way (``stopping``): the second ends the process, nothing printed."""
    res = _armed_script("interrupts._watch.stopping = True\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)")
    assert res.returncode == 130 and res.stderr == ""


def test_a_stage_process_is_stopped_and_named():
    res = _armed_script(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "with interrupts.running('train t=2'):\n"
        "    print(child.pid, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n")
    child = int(res.stdout.split()[0])
    assert res.returncode == 130
    assert res.stderr.startswith("Ctrl-C: stopping during train t=2 ... stopped.")
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
