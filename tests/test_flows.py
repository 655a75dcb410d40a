"""The SPA pipeline through Prefect: whole flow, kill and resume, lock, sharding on Ray."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import _output_hashes
from conftest import flow_config as _config

from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.run.runlock import RunLock, RunLocked

SPA = str(Path(sys.executable).parent / "spa")


def test_whole_flow_writes_every_artifact_and_the_manifest(full_run):
    cfg, _, res = full_run
    lay = RunLayout.of(cfg)
    expected = {"prepare", "seed", "evaluate/0"} | {f"{s}/{t}" for t in (1, 2) for s in ("sample", "judge", "train", "evaluate")}
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert set(stages) == expected
    for t in (1, 2):
        for kind, path in (("prompts", lay.prompts(t)), ("responses", lay.responses(t)),
                           ("judgments", lay.judgments(t)), ("train_log", lay.train_log(t)), ("eval", lay.eval_table(t))):
            assert read_table(path, kind).num_rows > 0
        assert json.loads(lay.eval_summary(t).read_text())["iteration"] == t
    assert "| 2 |" in lay.report.read_text()
    assert "Finished in state Completed" in res.stdout + res.stderr
    assert not lay.checkpoints(1).exists()
    # the stage processes relayed their progress bars to the flow, which kept the state lines out of every log
    from spa.run.console import RELAY_MARK

    log = lay.log_file.read_text()
    assert "[train/2] done in" in log and RELAY_MARK.strip() not in log + res.stdout + res.stderr


def test_rerun_of_a_finished_flow_skips_every_stage(full_run):
    cfg, path, _ = full_run
    before = _output_hashes(Path(cfg.run_dir))
    res = subprocess.run([SPA, "run", str(path)], capture_output=True, text=True)
    assert res.returncode == 0
    log = res.stdout + res.stderr
    assert log.count("up to date") >= 11 and "done in" not in log
    assert _output_hashes(Path(cfg.run_dir)) == before


@pytest.mark.slow  # ~2.5 min; the stage-level kill-and-resume test (tests/test_training.py) stays in the default suite
def test_killed_flow_resumes_to_identical_artifacts(full_run, tmp_path, tiny_model_dir, prefs_file):
    cfg_ref, _, _ = full_run
    cfg, path = _config(tmp_path, tiny_model_dir, prefs_file, name="killed")
    lay = RunLayout.of(cfg)
    proc = subprocess.Popen([SPA, "run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    # kill inside iteration 1's training stage, once it has written a checkpoint
    while time.time() < deadline and not list(lay.checkpoints(1).glob("checkpoint-*/spa_state.json")):
        assert proc.poll() is None, "the flow ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not lay.model(1).exists()
    leftovers = [p for p in lay.root.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert leftovers == []
    res = subprocess.run([SPA, "run", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Continuing training from checkpoint" in res.stdout + res.stderr or "up to date" in res.stdout + res.stderr
    assert _output_hashes(lay.root) == _output_hashes(Path(cfg_ref.run_dir))


def test_second_flow_on_the_same_run_refuses(tmp_path, tiny_model_dir, prefs_file):
    cfg, path = _config(tmp_path, tiny_model_dir, prefs_file)
    with RunLock(cfg.run_dir, "test-holder"):
        with pytest.raises(RunLocked, match="in use by test-holder"):
            with RunLock(cfg.run_dir, "second"):
                pass
        res = subprocess.run([SPA, "run", str(path)], capture_output=True, text=True)
    assert res.returncode == 3
    assert "in use by test-holder" in res.stderr
    with RunLock(cfg.run_dir, "after"):  # released when the holder leaves
        pass


@pytest.mark.slow  # ~1.5 min (a local Ray cluster); sharding without Ray: tests/test_sharding.py
def test_sharded_judge_on_ray_equals_single_shard(full_run, tmp_path):
    """A copy of the finished run, judgments removed: the flow judges in 2 shards on a local Ray
    instance with 2 CPU workers, merges them into the same bytes, and every other stage is up to date."""
    pytest.importorskip("prefect_ray")
    import shutil

    from spa.run.manifest import Manifest

    cfg_ref, ref_path, _ = full_run
    run = tmp_path / "ray"
    shutil.copytree(cfg_ref.run_dir, run)
    lay, ref = RunLayout(run), RunLayout.of(cfg_ref)
    for t in (1, 2):
        Manifest(lay.manifest).forget(f"judge/{t}")
        lay.judgments(t).unlink()
    path = tmp_path / "ray.yaml"
    raw = yaml.safe_load(ref_path.read_text())
    raw["run_dir"] = str(run)
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_DISABLE_USAGE_STATS": "1"}
    code = (
        "import ray\n"
        "ray.init(num_cpus=2, include_dashboard=False)\n"
        "from spa_flows.pipeline import pipeline_with_runner\n"
        f"pipeline_with_runner('auto')(config={str(path)!r}, shards=2)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert {"judge/1/shard-0-of-2", "judge/1/shard-1-of-2", "judge/2/shard-1-of-2"} <= set(stages)
    for t in (1, 2):
        assert read_table(lay.judgments(t), "judgments").equals(read_table(ref.judgments(t), "judgments"))
    assert _output_hashes(run) == {k: v for k, v in _output_hashes(Path(cfg_ref.run_dir)).items()} | {
        k: v for k, v in _output_hashes(run).items() if "/shard-" in k}
    log = res.stdout + res.stderr
    assert "[train/1] up to date" in log and "[train/2] up to date" in log


def test_bad_input_is_not_retried_but_a_crash_is():
    from prefect.states import Failed

    from spa_tasks.stage_tasks import BadStageInput, StageFailed, _worth_retrying

    assert _worth_retrying(None, None, Failed(data=BadStageInput("schema"))) is False
    assert _worth_retrying(None, None, Failed(data=StageFailed("killed"))) is True


@pytest.mark.parametrize("mode", ["separate", "inline"])
def test_stage_task_raises_bad_input_for_exit_code_2(tmp_path, tiny_model_dir, prefs_file, mode):
    """Through a real (embedded) Prefect flow: a missing artifact fails the task once, as bad input."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from spa_tasks import stage_tasks
    from spa_tasks.stage_tasks import BadStageInput

    cfg, path = _config(tmp_path, tiny_model_dir, prefs_file, stage_processes=mode)

    @flow
    def judge_only():
        state = stage_tasks.judge.with_options(retry_delay_seconds=0)(str(path), 1, return_state=True)
        from prefect.exceptions import ObjectNotFound

        # task-run records reach the API asynchronously (events): wait for the final one
        deadline = time.time() + 30
        with get_client(sync_client=True) as client:
            while True:
                try:
                    run = client.read_task_run(state.state_details.task_run_id)
                    if run.state is not None and run.state.is_failed():
                        return state, run.run_count
                except ObjectNotFound:
                    pass
                if time.time() > deadline:
                    raise AssertionError("the failed task run never reached the API")
                time.sleep(0.2)

    state, run_count = judge_only()
    assert state.is_failed() and run_count == 1  # retries=2 is declared, but bad input is not retried
    with pytest.raises(BadStageInput, match="responses is missing"):
        state.result()


def test_inline_stages_write_the_same_artifacts(full_run, inline_run):
    """``stage_processes: inline`` runs every stage in the flow's process (bench P5) and writes exactly what
    the process-per-stage flow writes (the plan tests read that run: conftest.inline_run)."""
    cfg_ref, _, _ = full_run
    cfg, _, res = inline_run
    log = res.stdout + res.stderr
    assert "(in the flow's process)" in log and "Finished in state Completed" in log
    assert _output_hashes(Path(cfg.run_dir)) == _output_hashes(Path(cfg_ref.run_dir))
