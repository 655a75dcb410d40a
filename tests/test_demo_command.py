"""`spa demo` end to end on a small world (one iteration), through the real Prefect flow, with its comparison arms."""

import json
import subprocess
import sys
from pathlib import Path

from spa.run.artifacts import read_table

SPA = str(Path(sys.executable).parent / "spa")


def test_spa_demo_small_writes_report_with_the_oracle_numbers(tmp_path):
    res = subprocess.run([SPA, "demo", "--out", str(tmp_path / "demo"), "--small", "--iterations", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    report = (run / "report.md").read_text()
    assert "## Demo world" in report and "![demo metrics](demo_metrics.png)" in report
    assert (run / "demo_metrics.png").stat().st_size > 10_000
    metrics = json.loads((run / "demo_metrics.json").read_text())
    rows = metrics["spa"]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert 0 <= rows[1]["win_rate"] <= 100 and 0 <= rows[1]["self_label_accuracy"] <= 1
    assert rows[1]["sr_precision"] is None or 0 <= rows[1]["sr_precision"] <= 1
    # the label diagnostics come from the judge stage's own summary
    judged = json.loads((run / "iter_1" / "judge_summary.json").read_text())
    assert rows[1]["self_label_accuracy"] == judged["self_label_accuracy"]
    assert 0 <= judged["judge_shorter_wins"] <= 1 and 0 <= judged["oracle_shorter_wins"] <= 1
    # the comparison arms: SFT, seed-only DPO, iterative DPO, and both under 20% flipped labels
    arms = metrics["arms"]
    assert set(arms) == {"sft", "seed_dpo", "iterative_dpo", "spa", "iterative_dpo_flip", "spa_flip"}
    assert arms["spa"] == rows and arms["seed_dpo"] == rows[:1]
    assert arms["spa_flip"][1]["flip_rate"] > 0 and arms["iterative_dpo"][1].get("sr_precision") is None
    assert "### What the demo claims, checked on this run" in report and "## Labels and refinement flags" in report
    assert "### The judge on each oracle feature" in report and rows[1]["judge_feature_accuracy"]["opener"] is not None
    assert "under injected flips: SPA loses less win rate than iterative DPO" in report
    assert (tmp_path / "demo" / "arms" / "iterative_dpo" / "iter_1" / "model").is_dir()
    summary = json.loads((run / "iter_1" / "eval.json").read_text())
    assert summary["annotator"] == "python:spa.demo.world:prefer" and summary["n"] == 40
    outputs = read_table(run / "iter_1" / "eval.parquet", "eval")
    assert set(outputs.column("preference").to_pylist()) <= {1.0, 1.5, 2.0}
    assert "report:" in res.stdout
