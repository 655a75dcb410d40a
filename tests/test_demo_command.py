"""`spa demo` end to end on a small world (one iteration), through the real Prefect flow."""

import json
import subprocess
import sys
from pathlib import Path

from spa.artifacts import read_table

SPA = str(Path(sys.executable).parent / "spa")


def test_spa_demo_small_writes_report_with_the_oracle_numbers(tmp_path):
    res = subprocess.run([SPA, "demo", "--out", str(tmp_path / "demo"), "--small", "--iterations", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    report = (run / "report.md").read_text()
    assert "## Demo world" in report and "![demo metrics](demo_metrics.png)" in report
    assert (run / "demo_metrics.png").stat().st_size > 10_000
    rows = json.loads((run / "demo_metrics.json").read_text())
    assert [r["iteration"] for r in rows] == [0, 1]
    assert 0 <= rows[1]["win_rate"] <= 100 and 0 <= rows[1]["self_label_accuracy"] <= 1
    assert rows[1]["sr_precision"] is None or 0 <= rows[1]["sr_precision"] <= 1
    summary = json.loads((run / "iter_1" / "eval.json").read_text())
    assert summary["annotator"] == "python:spa.demo.world:prefer" and summary["n"] == 40
    outputs = read_table(run / "iter_1" / "eval.parquet", "eval")
    assert set(outputs.column("preference").to_pylist()) <= {1.0, 1.5, 2.0}
    assert "report:" in res.stdout
