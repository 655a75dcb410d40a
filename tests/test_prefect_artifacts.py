"""Results where Prefect users look: a tiny run against a real local Prefect server leaves a metrics table,
the report, links and a progress bar as artifacts under the run's key prefix, and names its task runs by
stage and iteration."""

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import prefect.main  # noqa: F401  at collection: its import-time logging setup replaces the root logger's
import pytest  # handlers, and would drop caplog's if it first ran inside a test (this file alone failed so)
import yaml
from conftest import tiny_config

from spa.run.layout import RunLayout

BIN = Path(sys.executable).parent
ORACLE = '''
def prefer_shorter(instruction, output_1, output_2):
    """Annotator and oracle for the test (alpaca-eval encoding): the shorter text wins, equal lengths tie."""
    return 1.0 if len(output_1) < len(output_2) else 2.0 if len(output_2) < len(output_1) else 1.5
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``prefect server start`` on 127.0.0.1 (own home and database) for this module's runs."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home / "home")}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if time.time() > deadline:
                os.killpg(proc.pid, 9)
                pytest.fail("Prefect server did not start:\n" + (home / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    yield url, {**env, "PREFECT_API_URL": url}
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(f"{url}/{path}", data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _spa_run(path: Path, env: dict) -> float:
    start = time.time()
    res = subprocess.run([str(BIN / "spa"), "run", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    logs = "".join(log.read_text() for log in RunLayout(yaml.safe_load(path.read_text())["run_dir"]).root.rglob("*.log"))
    assert "not published" not in res.stdout + res.stderr + logs  # no artifact failed on a healthy server
    return time.time() - start


def _eval_set(path: Path) -> Path:
    rows = [{"instruction": f"Say something about topic {i}.", "output": "ok" + " and a long reference answer" * (i % 3),
             "generator": "reference"} for i in range(4)]
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(server, tmp_path_factory, tiny_model_dir, prefs_file):
    """One iteration on the tiny model, stages inline, scored by a Python annotator and checked by an oracle,
    in a run directory whose name needs sanitising; run twice (the second time every stage is up to date)."""
    url, env = server
    root = tmp_path_factory.mktemp("artifacts")
    (root / "tiny_oracle.py").write_text(ORACLE)
    cfg = tiny_config(root / "Tiny_Run.1", tiny_model_dir, prefs_file, stage_processes="inline",
                      judge={"oracle": "python:tiny_oracle:prefer_shorter"},
                      evaluate={"eval_set": str(_eval_set(root / "eval_set.json")),
                                "annotator": "python:tiny_oracle:prefer_shorter"})
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**env, "PYTHONPATH": str(root)}
    first = _spa_run(path, env)
    after_first = _api(url, "artifacts/filter")
    second = _spa_run(path, env)
    print(f"\ntiny run: {first:.1f} s, rerun: {second:.1f} s")
    return cfg, url, after_first


def _prefixed(artifacts: list[dict], prefix: str) -> dict[str, list[dict]]:
    """Artifacts by key (only this run's), each key's versions oldest first."""
    out: dict[str, list[dict]] = {}
    for a in sorted(artifacts, key=lambda a: a["created"]):
        if (a.get("key") or "").startswith(prefix + "-"):
            out.setdefault(a["key"], []).append(a)
    return out


def _rows(artifact: dict) -> list[dict]:
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


def test_key_prefix_is_sanitised_stable_and_distinct_per_run_directory(tmp_path):
    from spa_tasks.artifacts import key_prefix

    prefix = key_prefix(tmp_path / "My Run_2024.v1")
    assert re.fullmatch(r"spa-my-run-2024-v1-[0-9a-f]{6}", prefix)
    assert key_prefix(tmp_path / "My Run_2024.v1") == prefix  # reruns of a run directory stack their versions
    assert key_prefix(tmp_path / "other" / "My Run_2024.v1") != prefix  # same name elsewhere: its own keys
    assert re.fullmatch(r"spa-run-[0-9a-f]{6}", key_prefix(tmp_path / "___"))
    assert re.fullmatch(r"spa-quickstart-run-[0-9a-f]{6}", key_prefix(tmp_path / "quickstart" / "run"))
    assert re.fullmatch(r"[a-z0-9-]+", key_prefix(tmp_path / ("Ü" * 80 + "x" * 80)))


def test_artifacts_hold_the_runs_metrics_and_report(tiny_run):
    from spa_tasks.artifacts import key_prefix

    cfg, url, after_first = tiny_run
    lay = RunLayout.of(cfg)
    prefix = key_prefix(lay.root)
    assert prefix.startswith("spa-tiny-run-1-")
    first = _prefixed(after_first, prefix)
    keys = {f"{prefix}-{kind}" for kind in ("metrics", "report", "run-dir", "report-file", "progress")}
    assert set(first) == keys
    metrics = first[f"{prefix}-metrics"]
    assert [a["type"] for a in metrics] == ["table", "table"]  # one version after evaluate t=0, one after t=1
    assert [r["iteration"] for r in _rows(metrics[0])] == [0]
    rows = _rows(metrics[-1])
    assert [r["iteration"] for r in rows] == [0, 1]
    for row in rows:
        ev = json.loads(lay.eval_summary(row["iteration"]).read_text())
        assert ev["win_rate"] is not None and ev["gold_agreement"] is not None
        assert (row["win rate"], row["LC win rate"], row["gold agreement"], row["mean length"]) == (
            ev["win_rate"], ev["lc_win_rate"], ev["gold_agreement"], ev["avg_length"])
    assert rows[0]["self-label accuracy"] is None  # the seed stage judges nothing
    accuracy = json.loads(lay.judge_summary(1).read_text())["self_label_accuracy"]
    assert accuracy is not None and rows[1]["self-label accuracy"] == accuracy
    (report,) = first[f"{prefix}-report"]
    assert report["type"] == "markdown" and lay.report.read_text() in report["data"]
    assert lay.root.as_uri() in report["data"]
    for kind, target in (("run-dir", lay.root), ("report-file", lay.report)):  # a link is stored as markdown
        assert [a["data"] for a in first[f"{prefix}-{kind}"]] == [f"[{target}]({target.as_uri()})"]
    (progress,) = first[f"{prefix}-progress"]
    assert progress["type"] == "progress" and progress["data"] == pytest.approx(100.0)


def test_a_rerun_stacks_new_versions_under_the_same_keys(tiny_run):
    from spa_tasks.artifacts import key_prefix

    cfg, url, after_first = tiny_run
    prefix = key_prefix(RunLayout.of(cfg).root)
    before, now = _prefixed(after_first, prefix), _prefixed(_api(url, "artifacts/filter"), prefix)
    assert set(now) == set(before)
    assert {k: len(v) for k, v in now.items()} == {k: 2 * len(v) for k, v in before.items()}
    latest = {a["key"]: a for a in _api(url, "artifacts/latest/filter") if a["key"] in now}
    assert _rows(latest[f"{prefix}-metrics"]) == _rows(before[f"{prefix}-metrics"][-1])


def test_task_runs_are_named_by_stage_and_iteration(tiny_run):
    _, url, _ = tiny_run
    expected = {"prepare", "seed", "evaluate t=0", "sample t=1", "judge t=1", "train t=1", "evaluate t=1", "report"}
    deadline = time.time() + 30  # task-run records reach the API through events, shortly after the flow
    while not expected <= (names := {r["name"] for r in _api(url, "task_runs/filter")}):
        assert time.time() < deadline, sorted(names)
        time.sleep(0.5)
    assert not [n for n in names if re.fullmatch(r"[a-z-]+-\d+", n)], sorted(names)  # no `evaluate-460` left


def test_task_run_names_of_shards_and_merges():
    from spa_tasks import stage_tasks as st
    from spa_tasks.stage_tasks import task_run_name

    assert task_run_name(st.sample, config="c", t=2, shard="1/4") == "sample t=2 shard 1/4"
    assert task_run_name(st.judge, config="c", t=3) == "judge t=3"
    assert task_run_name(st.merge_samples, config="c", t=2, shards=4) == "merge samples t=2 (4 shards)"
    assert task_run_name(st.merge_judgments, config="c", t=2, shards=4) == "merge judgments t=2 (4 shards)"
    assert task_run_name(st.prepare, config="c") == "prepare"


@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow or task run")
def test_unreachable_api_is_one_warning_line_and_the_run_goes_on(tmp_path, tiny_model_dir, prefs_file, caplog):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from spa_tasks import artifacts

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    lay = RunLayout.of(cfg)
    lay.iteration(0).mkdir(parents=True)
    lay.eval_summary(0).write_text(json.dumps({"iteration": 0, "win_rate": 50.0, "avg_length": 3.0}))
    lay.report.write_text("# report\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    start = time.time()
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{_free_port()}/api"}), \
            caplog.at_level(logging.WARNING, logger=artifacts.__name__):
        assert artifacts.metrics_rows(lay) == [{"iteration": 0, "win rate": 50.0, "LC win rate": None,
                                                "gold agreement": None, "self-label accuracy": None,
                                                "mean length": 3.0}]
        artifacts.publish_metrics(str(path))
        artifacts.publish_report(str(path))
        progress = artifacts.Progress(cfg.run_dir, total=3)
        progress.step("prepare")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # one line per failed publication, none for the skipped progress update
    assert all("not published" in w and "\n" not in w for w in warnings), warnings
    assert time.time() - start < 30


def test_the_metrics_artifact_and_the_closing_table_read_the_same_rows(tmp_path):
    """One reader (``iteration_rows``) feeds both: an iteration still running is a row of Nones (dashes in the closing
    table) and stays out of the artifact; self-label accuracy comes from ``judge_summary.json``."""
    from spa.run.summary import iteration_rows
    from spa_tasks import artifacts

    lay = RunLayout(tmp_path / "run")
    for t in range(3):
        lay.iteration(t).mkdir(parents=True)
    lay.eval_summary(0).write_text(json.dumps({"win_rate": 55.0, "gold_agreement": 0.7, "avg_length": 7.0}))
    lay.eval_summary(1).write_text(json.dumps({"win_rate": 61.5, "lc_win_rate": 60.0, "avg_length": 7.4}))
    lay.judge_summary(1).write_text(json.dumps({"self_label_accuracy": 0.72, "pairs": 400}))
    rows = iteration_rows(lay)
    assert [(r["iteration"], r["evaluated"], r["win_rate"], r["self_label_accuracy"]) for r in rows] == [
        (0, True, 55.0, None), (1, True, 61.5, 0.72), (2, False, None, None)]
    assert artifacts.metrics_rows(lay) == [
        {"iteration": 0, "win rate": 55.0, "LC win rate": None, "gold agreement": 0.7, "self-label accuracy": None,
         "mean length": 7.0},
        {"iteration": 1, "win rate": 61.5, "LC win rate": 60.0, "gold agreement": None, "self-label accuracy": 0.72,
         "mean length": 7.4}]


def test_instruction_following_sets_in_the_artifact_the_closing_table_and_the_report(tmp_path, tiny_model_dir,
                                                                                     prefs_file):
    """Each set's prompt-level accuracies (%) become columns; report.md gets IFEval's four accuracies per set."""
    from spa.run.summary import closing_table
    from spa.stages.report import build_report
    from spa_tasks import artifacts

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    lay = RunLayout.of(cfg)
    lay.iteration(0).mkdir(parents=True)
    sets = {"dev": {"prompt_strict": 0.25, "prompt_loose": 0.3, "instruction_strict": 0.4, "instruction_loose": 0.5,
                    "n": 200, "skipped": 0, "avg_length": 61.5, "truncated_share": 0.125},
            "ifeval": {"prompt_strict": 0.1, "prompt_loose": 0.125, "instruction_strict": 0.2,
                       "instruction_loose": 0.25, "n": 477, "skipped": 64, "avg_length": 90.0, "truncated_share": 0.5}}
    lay.eval_summary(0).write_text(json.dumps({"gold_agreement": 0.6, "instruction_following": sets}))
    lay.manifest.write_text(json.dumps({"stages": {}}))
    row = artifacts.metrics_rows(lay)[0]
    assert {k: row[k] for k in row if k.endswith("(%)")} == {
        "dev prompt loose (%)": 30.0, "dev prompt strict (%)": 25.0,
        "ifeval prompt loose (%)": 12.5, "ifeval prompt strict (%)": 10.0}
    table = closing_table(cfg).splitlines()
    assert table[0].split() == ["iteration", "win", "rate", "LC", "win", "rate", "gold", "agreement", "self-label",
                                "acc.", "dev", "prompt", "loose", "ifeval", "prompt", "loose", "time"]
    assert table[2].split()[-3:-1] == ["30.0", "12.5"]
    report = build_report(cfg)
    assert "| pi_0 (seed DPO) | dev | 25.0 | 30.0 | 40.0 | 50.0 | 200 (0 skipped) | 61.5 | 12.5 |" in report
    assert "| pi_0 (seed DPO) | ifeval | 10.0 | 12.5 | 20.0 | 25.0 | 477 (64 skipped) | 90.0 | 50.0 |" in report
