"""SSPO's unpaired set D_U through ``spa prepare`` (spa/data/unpaired.py): disjoint from the run's splits, counted,
and a malformed row is one line, exit 2, nothing written."""

import json
import re

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_config
from typer.testing import CliRunner

from spa.data.sources import prompt_hash
from spa.errors import StageInputError
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.stages import prepare
from spa_tasks.cli import app


def _unpaired_source(tmp_path, prefs_file, run_prompts: int = 3):
    """Rows of every kind prepare must tell apart: new prompts (plain and in the messages layout), one repeated
    row, one empty response, and ``run_prompts`` rows whose prompt is a gold source prompt (one of them with other
    case and spacing)."""
    gold = [json.loads(line)["prompt"] for line in prefs_file.read_text().splitlines()]
    rows = [{"prompt": f"unpaired question {i}", "response": f"an answer {i}"} for i in range(6)]
    rows.append({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "chat prompt"},
                              {"role": "assistant", "content": "first"}, {"role": "user", "content": "more"},
                              {"role": "assistant", "content": "chat answer"}]})
    rows.append({"prompt": "unpaired question 0", "response": "an answer 0"})  # repeated
    rows.append({"prompt": "unpaired question 0", "response": "another answer"})  # same prompt, new response: kept
    rows.append({"prompt": "empty one", "response": "  "})
    rows += [{"prompt": ("  " + g.upper() + " ") if k == 0 else g, "response": "leaked"} for k, g in
             enumerate(gold[:run_prompts])]
    path = tmp_path / "unpaired.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, gold


def test_unpaired_rows_are_checked_counted_and_disjoint_from_every_split(tmp_path, tiny_model_dir, prefs_file):
    src, gold = _unpaired_source(tmp_path, prefs_file, run_prompts=60)  # every gold prompt: some are in no split
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, data={"unpaired_source": str(src)})
    res = prepare.run(cfg, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    table = read_table(lay.unpaired, "unpaired")
    run_prompts = set()
    for path, kind in ((lay.seed, "seed"), (lay.heldout, "heldout"), (lay.prompts(1), "prompts")):
        run_prompts |= set(map(prompt_hash, read_table(path, kind).column("prompt").to_pylist()))
    # 16 seed + 8 held-out + 16 prompt-set prompts of the 60 are the run's; the other 20 gold prompts are fair game
    assert len(run_prompts) == 40
    report = res.summary["unpaired"]
    assert report == {"rows_in": 70, "empty": 1, "duplicate": 1, "overlap_with_run_prompts": 40, "unpaired": 28}
    assert table.num_rows == 28 and not set(map(prompt_hash, table.column("prompt").to_pylist())) & run_prompts
    rows = table.to_pylist()
    assert {"prompt_id": prompt_hash("chat prompt"), "prompt": "chat prompt", "response": "chat answer",
            "source_row": 6} in rows
    assert [r["response"] for r in rows if r["prompt"] == "unpaired question 0"] == ["an answer 0", "another answer"]
    assert [r["source_row"] for r in rows] == sorted(r["source_row"] for r in rows)


def test_unpaired_size_draws_a_seeded_subset_and_too_many_is_an_error(tmp_path, tiny_model_dir, prefs_file):
    src, _ = _unpaired_source(tmp_path, prefs_file)
    picks = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file, data={"unpaired_source": str(src),
                                                                             "unpaired_size": 4})
        prepare.run(cfg, echo=lambda _: None)
        picks.append(pq.read_table(RunLayout(cfg.run_dir).unpaired).column("source_row").to_pylist())
    assert len(picks[0]) == 4 and picks[0] == picks[1]
    cfg = tiny_config(tmp_path / "c", tiny_model_dir, prefs_file, data={"unpaired_source": str(src),
                                                                        "unpaired_size": 50})
    with pytest.raises(StageInputError, match=r"usable unpaired rows of 13 .* but data.unpaired_size asks for 50"):
        prepare.run(cfg, echo=lambda _: None)


def test_no_unpaired_source_writes_no_unpaired_set_and_keeps_the_resume_key(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    prepare.run(cfg, echo=lambda _: None)
    assert not RunLayout(cfg.run_dir).unpaired.exists()
    dumped = cfg.model_dump(mode="json")["data"]
    assert "unpaired_source" not in dumped and "unpaired_size" not in dumped  # older runs' keys stay the same


@pytest.mark.parametrize("bad, says", [
    ({"prompt": "q", "answer": "a"}, r"row 1 has no response \(its columns: prompt, answer\)"),
    ({"prompt": "q", "response": None}, r"column 'response' row 1: the value is null"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"row 1 has no response"),
    ({"messages": "q"}, r"column 'messages' row 1: expected a list of messages"),
    ({"prompt": 3, "response": "a"}, r"column 'prompt' row 1: expected a string, got int"),
], ids=["no-response-column", "null", "no-assistant-turn", "messages-not-a-list", "prompt-not-text"])
def test_a_malformed_unpaired_row_is_one_line_exit_2_and_nothing_written(tmp_path, tiny_model_dir, prefs_file, bad,
                                                                           says):
    src = tmp_path / "unpaired.jsonl"
    src.write_text(json.dumps({"prompt": "fine", "response": "fine"}) + "\n" + json.dumps(bad) + "\n")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, data={"unpaired_source": str(src)})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["prepare", "-c", str(path)])
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: ") and "Traceback" not in res.output
    assert re.search(says, lines[0]), lines[0]
    data = RunLayout(cfg.run_dir).data
    assert not data.exists() or not any(p.suffix == ".parquet" for p in data.iterdir())
