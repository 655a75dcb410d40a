"""Model settings given as hub ids resolve, offline, through a hub-layout cache the test builds itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from spa.config.hub import parse_hub_id, resolve_model_refs
from spa.errors import ConfigError

SPA = str(Path(sys.executable).parent / "spa")
MAIN = "a" * 40
OLD = "b" * 40


def build_cache(hf_home: Path, model_dir: Path, repo: str = "org/tiny") -> Path:
    """``HF_HOME/hub/models--org--tiny`` with two snapshots: ``main`` -> MAIN, tag ``v1`` -> OLD."""
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    for commit in (MAIN, OLD):
        shutil.copytree(model_dir, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(MAIN)
    (root / "refs" / "v1").write_text(OLD)
    return root


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    from huggingface_hub import constants

    root = build_cache(tmp_path / "hf", tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_hub_ids_are_told_from_local_paths(tmp_path):
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct@v1.0") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1.0")
    assert parse_hub_id(str(tmp_path)) is None  # an existing directory is always a path
    assert parse_hub_id("./models/sft") is None and parse_hub_id("/abs/path") is None
    assert parse_hub_id("runs/demo/world/pi_init") is None  # more than one slash: a path


def test_hub_id_resolves_to_the_snapshot_of_main_and_records_the_commit(hub_cache):
    out = resolve_model_refs({"model": {"pi_init": "org/tiny"}, "judge": {"llm_judge_model": "org/tiny@v1"}})
    assert out["model"]["pi_init"] == str(hub_cache / "snapshots" / MAIN)
    assert out["judge"]["llm_judge_model"] == str(hub_cache / "snapshots" / OLD)
    assert out["model"]["hub_refs"] == {
        "model.pi_init": {"repo_id": "org/tiny", "revision": "main", "commit": MAIN},
        "judge.llm_judge_model": {"repo_id": "org/tiny", "revision": "v1", "commit": OLD},
    }
    again = resolve_model_refs(out)  # a resolved config (the run directory's config.yaml) stays as it is
    assert again == out


def test_pinned_commit_resolves_to_that_snapshot(hub_cache):
    out = resolve_model_refs({"model": {"pi_init": f"org/tiny@{OLD}"}})
    assert out["model"]["pi_init"].endswith(OLD) and out["model"]["hub_refs"]["model.pi_init"]["commit"] == OLD


def test_missing_model_is_one_config_error_naming_the_setting(hub_cache):
    with pytest.raises(ConfigError, match=r"^model\.pi_0: org/absent@main is not in the local cache") as err:
        resolve_model_refs({"model": {"pi_init": "org/tiny", "pi_0": "org/absent@main"}})
    assert "\n" not in str(err.value)


def test_an_unknown_name_without_revision_stays_a_path_for_the_preflight_check(hub_cache):
    """``models/sft`` (a folder not downloaded yet) must not become a hub error: the preflight names it."""
    from spa.config import parse_config
    from spa.run.preflight import problems

    raw = {"run_dir": "r", "model": {"pi_init": "models/sft"}}
    out = resolve_model_refs(raw)
    assert out["model"]["pi_init"] == "models/sft" and "hub_refs" not in out["model"]
    found = problems(parse_config(out))
    assert any(p.startswith("model.pi_init: models/sft is not a directory") and "hub id" in p for p in found)


def test_hub_model_without_safetensors_is_refused(hub_cache):
    for f in (hub_cache / "snapshots" / MAIN).glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError, match="no \\*.safetensors weights"):
        resolve_model_refs({"model": {"pi_init": "org/tiny"}})


def test_a_run_configured_by_hub_id_prepares_and_plans_offline(tmp_path, tiny_model_dir, prefs_file):
    """Through the command line, with ``HF_HOME`` pointing at the test's cache: the run directory's resolved
    config names the snapshot and the commit; a second ``spa plan`` finds prepare up to date; a missing model
    is one line and exit 2."""
    import json
    import os

    build_cache(tmp_path / "hf", tiny_model_dir)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    raw = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file).model_dump(mode="json")
    raw["model"]["pi_init"] = "org/tiny"
    raw["model"].pop("hub_refs", None)
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = subprocess.run([SPA, "prepare", str(path)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["pi_init"].endswith(f"snapshots/{MAIN}")
    assert saved["model"]["hub_refs"]["model.pi_init"] == {"repo_id": "org/tiny", "revision": "main", "commit": MAIN}
    plan = subprocess.run([SPA, "plan", str(path), "--json"], capture_output=True, text=True, env=env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    statuses = {key: status for r in json.loads(plan.stdout) for key, status in r["stages"].items()}
    assert statuses["prepare"] == "done"
    raw["model"]["pi_init"] = "org/absent@v2"
    path.write_text(yaml.safe_dump(raw))
    res = subprocess.run([SPA, "check-config", str(path)], capture_output=True, text=True, env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "model.pi_init: org/absent@v2 is not in the local cache" in res.stderr
