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


def _model_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_check_config_ok_and_saves(tmp_path):
    path = tmp_path / "c.yaml"
    source = tmp_path / "prefs.jsonl"
    source.write_text("")
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"source": str(source)},
                                    "model": {"pi_init": str(_model_folder(tmp_path / "m"))}}))
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


def test_flow_commands_quiet_the_temporary_servers_telemetry():
    """`spa run/expand/demo` start Prefect's temporary API server when PREFECT_API_URL is unset; its telemetry
    heartbeat races the flow on the same SQLite file ("database is locked" traceback in a first `spa demo`).
    Off by default there; a value the user set, or an outside server, is left alone."""
    from spa_tasks.cli import embedded_server_defaults

    env: dict[str, str] = {}
    assert embedded_server_defaults(env) == {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                                             "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    mine = {"PREFECT_SERVER_ANALYTICS_ENABLED": "true", "DO_NOT_TRACK": "0"}
    assert embedded_server_defaults(mine) == {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
    assert mine["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    outside = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    assert embedded_server_defaults(outside) == {} and "PREFECT_SERVER_ANALYTICS_ENABLED" not in outside


def test_missing_model_folder_is_one_line_before_any_server_starts(tmp_path):
    """A valid config naming a model folder that does not exist: check-config, plan and run all say so in one
    line with exit code 2, and `spa run` starts no Prefect server (it used to fail minutes in, retried)."""
    source = tmp_path / "prefs.jsonl"
    source.write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"source": str(source)},
                                    "model": {"pi_init": str(tmp_path / "no-such-model")}}))
    for args in (["check-config", str(path)], ["plan", str(path)], ["run", str(path)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "model.pi_init" in lines[0], (args, lines)
        assert "no-such-model" in lines[0] and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()



def test_every_command_takes_the_config_as_argument_or_with_c(tmp_path, tiny_model_dir, prefs_file):
    """`spa prepare run.yaml` and `spa plan -c run.yaml` both work (commands used to disagree on the form)."""
    from conftest import tiny_config

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for command in ("prepare", "check-config", "plan", "report"):
        for args in ([command, str(path)], [command, "-c", str(path)]):
            res = runner.invoke(app, args)
            assert res.exit_code == 0, (args, res.output)
    neither = runner.invoke(app, ["prepare"])
    assert neither.exit_code == 2 and "give the run's YAML config" in neither.output
    other = tmp_path / "other.yaml"
    other.write_text(path.read_text())
    both = runner.invoke(app, ["plan", str(path), "-c", str(other)])
    assert both.exit_code == 2 and "two configs given" in both.output
    # a stage with nothing to do for this config says so in one line (SSPO's pi_init sampling, no such source here)
    nothing = runner.invoke(app, ["unpaired", str(path)])
    assert nothing.exit_code == 2 and "nothing to sample" in nothing.output
