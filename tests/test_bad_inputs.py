"""Bad input is one line naming what and where, exit code 2, no traceback and no output (docs/usage.md, "Bad input").

Two halves: every ``BadInput`` class of ``spa.errors`` raised from a stage reaches the user as that line, and a
catalogue of broken sources run through the real ``spa prepare`` command.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WORDS, tiny_config, write_preferences
from typer.testing import CliRunner

import spa.errors
from spa_tasks.cli import app

BAD_INPUT_CLASSES = sorted((cls for _, cls in inspect.getmembers(spa.errors, inspect.isclass)
                            if issubclass(cls, spa.errors.BadInput)), key=lambda cls: cls.__name__)


def config_file(tmp_path: Path, pi_init, source, **sections) -> Path:
    cfg = tiny_config(tmp_path / "run", pi_init, source, **sections)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_the_list_of_bad_input_classes_is_complete():
    names = {cls.__name__ for cls in BAD_INPUT_CLASSES}
    assert len(names) >= 10 and {"BadInput", "EvalSetError", "StageInputError", "ConfigError"} <= names
    assert "RunLocked" not in names  # exit code 3, not bad input


@pytest.mark.parametrize("error", BAD_INPUT_CLASSES, ids=lambda cls: cls.__name__)
def test_every_bad_input_class_is_one_line_and_exit_code_2(tmp_path, tiny_model_dir, prefs_file, monkeypatch, error):
    from spa.stages import prepare

    def planted(cfg, **_):
        raise error(f"planted {error.__name__} in {cfg.data.source}")

    monkeypatch.setattr(prepare, "run", planted)
    res = CliRunner().invoke(app, ["prepare", "-c", str(config_file(tmp_path, tiny_model_dir, prefs_file))])
    assert res.exit_code == 2, (res.output, res.exception)
    assert res.output.strip().splitlines() == [f"error: planted {error.__name__} in {prefs_file}"]
    assert "Traceback" not in res.output


# --- the catalogue: broken sources through the real command -------------------------------------------------


def truncated_parquet(tmp_path, prefs_file):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in prefs_file.read_text().splitlines()]), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, ["Parquet"]


def text_named_parquet(tmp_path, prefs_file):
    path = tmp_path / "text.parquet"
    path.write_text("prompt,chosen,rejected\nhello,a,b\n")
    return path, ["Parquet"]


def jsonl_with_a_broken_line(tmp_path, prefs_file):
    lines = prefs_file.read_text().splitlines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # line 5 cut mid-object
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, ["line 5"]


def no_chosen_column(tmp_path, prefs_file):
    rows = [{k: v for k, v in json.loads(line).items() if k != "chosen"} for line in prefs_file.read_text().splitlines()]
    path = tmp_path / "nochosen.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, ["'chosen'", "row 0"]


def no_rejected_column(tmp_path, prefs_file):
    lines = [{k: v for k, v in json.loads(line).items() if k != "rejected"} for line in prefs_file.read_text().splitlines()]
    path = tmp_path / "norejected.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path, ["row 0 has no column 'rejected'", "its columns: prompt, chosen"]


def empty_jsonl(tmp_path, prefs_file):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path, ["no rows"]


def empty_parquet(tmp_path, prefs_file):
    path = tmp_path / "empty.parquet"
    path.write_bytes(b"")
    return path, ["Parquet"]


def overlong_prompt(tmp_path, prefs_file):
    path = write_preferences(tmp_path / "long.jsonl", n=40)  # 16 + 8 + 16: every row is drawn
    lines = path.read_text().splitlines()
    row = json.loads(lines[7])
    row["prompt"] = " ".join(WORDS[i % len(WORDS)] for i in range(400))  # over model.max_length (256)
    lines[7] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    return path, ["row 7", "tokens", "max_length"]


CATALOGUE = [truncated_parquet, text_named_parquet, jsonl_with_a_broken_line, no_chosen_column, no_rejected_column,
             empty_jsonl, empty_parquet, overlong_prompt]


def run_prepare(cfg_path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spa_tasks.stage_cli", "prepare", "-c", str(cfg_path)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_and_nothing_written(res: subprocess.CompletedProcess, run_dir: Path, *names: str) -> str:
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    data = run_dir / "data"
    assert not data.exists() or not [p for p in data.rglob("*") if p.is_file()]
    return lines[0]


@pytest.mark.parametrize("make", CATALOGUE, ids=lambda f: f.__name__)
def test_broken_source_is_one_line_naming_it(tmp_path, tiny_model_dir, prefs_file, make):
    source, where = make(tmp_path, prefs_file)
    data = {"overlong": "fail"} if make is overlong_prompt else {}
    cfg_path = config_file(tmp_path, tiny_model_dir, source, data=data)
    assert_one_line_and_nothing_written(run_prepare(cfg_path, tmp_path), tmp_path / "run", str(source), *where)


def test_missing_model_directory_is_one_line_naming_it(tmp_path, prefs_file):
    missing = tmp_path / "no-such-model"
    cfg_path = config_file(tmp_path, missing, prefs_file)
    assert_one_line_and_nothing_written(run_prepare(cfg_path, tmp_path), tmp_path / "run", str(missing))
