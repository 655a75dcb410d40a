"""docker/: the compose file validates with Debian's docker-compose (no engine needed)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"

needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None,
                                   reason="docker-compose not installed (bash install.sh --compose)")


def _config(**env):
    res = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config"], capture_output=True, text=True,
                         env={**os.environ, **env}, cwd=COMPOSE.parent)
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


@needs_compose
def test_compose_file_validates_and_binds_loopback():
    cfg = _config()
    assert set(cfg["services"]) == {"postgres", "prefect-server", "worker"}
    (port,) = cfg["services"]["prefect-server"]["ports"]
    assert str(port.get("host_ip", port) if isinstance(port, dict) else port).startswith("127.0.0.1")
    worker = cfg["services"]["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert any(str(v).startswith("runs:/runs") or (isinstance(v, dict) and v.get("target") == "/runs") for v in worker["volumes"])
    assert "postgresql+asyncpg" in cfg["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]


@needs_compose
def test_compose_bind_address_is_configurable():
    (port,) = _config(SPA_PREFECT_BIND="0.0.0.0")["services"]["prefect-server"]["ports"]
    assert "0.0.0.0" in str(port)


def test_images_pin_torch_and_never_run_as_root():
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        assert "USER spa" in text
        assert "HF_HUB_OFFLINE=1" in text
    assert "torch==2.13.0" in (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "vllm==" in (ROOT / "docker" / "Dockerfile.gpu").read_text()


def test_prefect_yaml_declares_both_deployments_with_expand_schedule_off():
    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in cfg["deployments"]}
    assert deps["spa-pipeline"]["entrypoint"] == "flows/pipeline.py:spa_pipeline"
    assert deps["spa-expand"]["entrypoint"] == "flows/expand.py:expand"
    assert all(d["work_pool"]["name"] == "spa-process" for d in deps.values())
    (sched,) = deps["spa-expand"]["schedules"]
    assert sched["cron"] and sched["active"] is False
