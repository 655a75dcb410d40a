import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from spa_tasks.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "check-config" in res.output and "tiny-model" in res.output


def test_check_config_ok_and_saves(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "model": {"pi_init": "m"}}))
    res = runner.invoke(app, ["check-config", str(path), "--save"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "config.yaml").exists()
    assert '"learning_rate": 5e-07' in res.output


def test_check_config_bad_key_exits_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": "r", "model": {"pi_init": "m"}, "trian": {}}))
    res = runner.invoke(app, ["check-config", str(path)])
    assert res.exit_code == 2
    assert "trian" in res.output


def test_tiny_model_command(tmp_path):
    res = runner.invoke(app, ["tiny-model", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m" / "model.safetensors").exists()


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "spa"
    assert exe.exists(), f"the `spa` console script is not installed beside {sys.executable}"
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == __import__("spa").__version__
