"""A real Prefect server on 127.0.0.1: deploy from prefect.yaml, trigger `expand`, run a worker once."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from spa.run.artifacts import read_table
from spa.run.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _prefect(env, *args, timeout=600):
    res = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"prefect {' '.join(args)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def test_expand_deployment_uses_exactly_the_new_prompts(prefect_server, inline_run, tmp_path):
    cfg_ref, ref_path, _ = inline_run
    run = tmp_path / "run"
    shutil.copytree(cfg_ref.run_dir, run)
    raw = yaml.safe_load(ref_path.read_text())
    raw["run_dir"] = str(run)
    raw["stage_processes"] = "separate"  # the new iteration's stages each in its own process, as on a GPU machine
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    lay = RunLayout(run)
    used = read_table(lay.prompts(1), "prompts").column("prompt").to_pylist()[:2]
    fresh = ["Name three colours of fruit.", "Write about plums in winter.", "Is a lemon yellow?"]
    (run / "incoming").mkdir()
    pq.write_table(pa.table({"prompt": fresh + [used[0].upper(), used[1]]}), run / "incoming" / "batch-001.parquet")

    env = {**prefect_server, "SPA_PROJECT_DIR": str(ROOT), "SPA_CONFIG": str(config)}
    _prefect(env, "work-pool", "create", "spa-process", "--type", "process")
    _prefect(env, "--no-prompt", "deploy", "--all")
    out = _prefect(env, "deployment", "ls")
    assert "spa-expand" in out and "spa-pipeline" in out
    out = _prefect(env, "deployment", "run", "spa-expand/spa-expand")
    assert "Created flow run" in out
    _prefect(env, "worker", "start", "--pool", "spa-process", "--run-once", timeout=900)

    prompts = read_table(lay.prompts(3), "prompts").column("prompt").to_pylist()
    assert sorted(prompts) == sorted(fresh)  # exactly the new prompts: the two used ones were dropped
    assert read_table(lay.responses(3), "responses").num_rows == 3
    assert (lay.model(3) / "model.safetensors").exists()
    ledger = json.loads((run / "expansion.json").read_text())["batches"]
    (entry,) = ledger.values()
    assert entry == {"file": "batch-001.parquet", "iteration": 3, "status": "done", "new": 3, "overlap": 2,
                     "duplicates": 0}
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert {"sample/3", "judge/3", "train/3", "evaluate/3"} <= set(stages)
