"""`spa plan`: the resolved rounds and what a rerun would redo, without loading a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_config

from spa.config import parse_config
from spa.stages import prepare
from spa_tasks.plan import format_plan, plan


def _cfg(tmp_path, **over):
    raw = {"run_dir": str(tmp_path / "run"), "model": {"pi_init": str(tmp_path / "init")},
           "data": {"source": str(tmp_path / "prefs.jsonl")}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return parse_config(raw)


def test_paper_defaults_resolved(tmp_path):
    rounds = plan(_cfg(tmp_path))
    assert [r.t for r in rounds] == [0, 1, 2, 3]
    seed = dict(rounds[0].lines)
    assert seed["data"] == "D_0: 2000 gold pairs"
    assert "<= 188 optimiser steps (2000 pairs x 3 epoch(s) / batch 32)" in seed["train"]  # ceil(6000 / 32)
    assert seed["loss"].startswith("DPO, beta 0.1, lr 5e-07") and "SR" not in seed["loss"]
    assert "reference pi_init (log-probs computed once before training)" in seed["train"]
    for t, lam in ((1, "0.5"), (2, "0.25"), (3, "0.125")):
        lines = dict(rounds[t].lines)
        assert f"DND lambda {lam}" in lines["loss"]
        assert "label smoothing 0.1 on the 10% least confident of the last 50 pairs after 20% of the steps" in lines["loss"]
        assert lines["train"].startswith(f"pi_{t - 1} -> pi_{t}, reference pi_{t - 1} (model in memory: DND)")
        assert "against pi_init" in lines["judge"]
        assert "2 responses each from pi_" + str(t - 1) in lines["sample"]
    assert "<= 250 optimiser steps (8000 pairs" in dict(rounds[1].lines)["train"]
    assert all(s == "to run" for r in rounds for s in r.stages.values())
    assert list(rounds[0].stages) == ["prepare", "seed", "evaluate/0"]


def test_reference_and_refinement_switches(tmp_path):
    cfg = _cfg(tmp_path, judge={"reference": "previous", "select": "best_worst", "policy_logps": "from_sampling"},
               sample={"n": 4}, train={"refinement": {"decoupled": False}})
    rounds = plan(cfg)
    judges = [dict(r.lines)["judge"] for r in rounds[1:]]
    assert "of pi_0 against pi_init" in judges[0]
    assert "of pi_1 against pi_0" in judges[1] and "of pi_2 against pi_1" in judges[2]
    assert "pi_1's log-probs reused from sampling" in judges[1]
    assert all("best vs worst" in j for j in judges)
    assert "DND off" in dict(rounds[1].lines)["loss"]
    assert "reference pi_0 (log-probs computed once before training)" in dict(rounds[1].lines)["train"]
    text = format_plan(cfg, rounds)
    assert "iteration 3" in text and "status" in text


def test_sspo_and_its_control_are_planned_with_the_unpaired_set(tmp_path):
    """The seed stage of SSPO: the unpaired set beside D_0, no reference, steps over pairs and unpaired answers,
    SSPO's own settings; DPO+SFT keeps DPO's reference; the iterations after either are SPA's refined DPO."""
    src = str(tmp_path / "u.jsonl")
    seed = dict(plan(_cfg(tmp_path, data={"unpaired_source": src, "unpaired_size": 500},
                          train={"loss": "sspo", "sspo": {"threshold": "min_chosen"}}))[0].lines)
    assert seed["data"] == f"D_0: 2000 gold pairs; D_U: 500 rows of {src} (counted by prepare)"
    assert "no reference (SSPO's reward is reference-free)" in seed["train"]
    assert "SimPO reward beta 10, margin 2, prior 0.5, threshold min_chosen, curriculum decay 0.005" in seed["loss"]
    rounds = plan(_cfg(tmp_path, data={"unpaired_source": src}, train={"loss": "dpo+sft"}))
    seed = dict(rounds[0].lines)
    assert "reference pi_init (log-probs computed once before training)" in seed["train"]
    assert seed["loss"].startswith("DPO+SFT (DPO on the pairs + 1 x NLL of the unpaired answers), beta 0.1")
    assert dict(rounds[1].lines)["loss"].startswith("DPO, beta 0.1") and "DND lambda 0.5" in dict(rounds[1].lines)["loss"]
    # the unpaired set drawn from pi_init: its own stage before the seed stage, over the run's prompt batches
    drawn = plan(_cfg(tmp_path, data={"unpaired_source": "pi_init", "unpaired_size": 0.25}, train={"loss": "sspo"}))
    assert dict(drawn[0].lines)["data"] == ("D_0: 2000 gold pairs; D_U: one pi_init sample for 25% of the prompts of "
                                            "X_1..X_3 (sampled by the seed stage)")
    assert list(drawn[0].stages) == ["prepare", "unpaired", "seed", "evaluate/0"]
    assert list(rounds[0].stages) == ["prepare", "seed", "evaluate/0"]
    implicit = dict(plan(_cfg(tmp_path, data={"unpaired_source": src}, train={"loss": "sspo", "sspo": {"reward": "implicit"}}))[0].lines)
    assert "DPO's implicit reward beta 0.1 (unpaired loss beta 10), margin 0," in implicit["loss"]
    assert "reference pi_init (model in memory: SSPO's implicit reward)" in implicit["train"]


def test_length_penalty_auto_says_its_sign(tmp_path):
    signed = plan(_cfg(tmp_path, judge={"length_penalty": "auto", "length_penalty_sign": "signed"}))
    paper = plan(_cfg(tmp_path, judge={"length_penalty": "auto"}))
    assert "length penalty a solved per round (either sign)" in dict(signed[1].lines)["judge"]
    assert "length penalty a solved per round (a >= 0, Eq. 13)" in dict(paper[1].lines)["judge"]


def test_no_seed_mode_skips_seed_and_its_evaluation(tmp_path):
    rounds = plan(_cfg(tmp_path, model={"pi_0": str(tmp_path / "given")}))
    assert list(rounds[0].stages) == ["prepare"]
    assert dict(rounds[0].lines)["train"].startswith("skipped: pi_0 given")


def test_status_of_a_finished_run_and_what_a_change_reruns(inline_run):
    cfg, path, _ = inline_run
    rounds = plan(cfg)
    assert all(s == "done" for r in rounds for s in r.stages.values()), [r.stages for r in rounds]
    assert "X_1: 12 prompts" in dict(rounds[1].lines)["sample"]  # the prepared count, from the Parquet footer
    # evaluation settings: only the evaluations rerun
    status = {k: v for r in plan(cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(
        update={"max_prompts": 3})})) for k, v in r.stages.items()}
    assert {k for k, v in status.items() if v != "done"} == {"evaluate/0", "evaluate/1", "evaluate/2"}
    assert status["evaluate/1"] == "reruns (config changed)"
    # sampling settings: iteration 1's sampling and everything after it
    status = {k: v for r in plan(cfg.model_copy(update={"sample": cfg.sample.model_copy(
        update={"temperature": 0.9})})) for k, v in r.stages.items()}
    assert status["prepare"] == status["seed"] == status["evaluate/0"] == "done"
    assert status["sample/1"] == "reruns (config changed)"
    assert status["judge/1"] == status["train/1"] == "reruns (an earlier stage reruns)"
    assert status["sample/2"] == "reruns (config changed)"


def test_a_new_checkpoint_cadence_reruns_nothing(inline_run):
    """train.save_steps only decides where checkpoints go: every finished stage stays done."""
    cfg, _, _ = inline_run
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"save_steps": cfg.train.save_steps + 6})})
    status = {k: v for r in plan(changed) for k, v in r.stages.items()}
    assert set(status.values()) == {"done"}, status


def test_iterations_added_by_expand_are_planned(inline_run, tmp_path):
    """`spa expand` claims iteration T + 1 for a new prompt batch (expansion.json): the plan shows that round
    with its prompts and what is still to run, after the configured ones."""
    from spa.data.expansion import plan_batch

    cfg, _, _ = inline_run
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    cfg = cfg.model_copy(update={"run_dir": str(tmp_path / "run")})
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps({"prompt": f"A brand new question {i}?"}) + "\n" for i in range(5)))
    claimed = plan_batch(cfg, batch)
    assert claimed is not None and claimed.iteration == 3 == cfg.iterations + 1
    rounds = plan(cfg)
    assert [r.t for r in rounds] == [0, 1, 2, 3]
    assert dict(rounds[3].lines)["sample"].startswith("X_3: 5 prompts of batch.jsonl (spa expand)")
    assert "pi_2 -> pi_3" in dict(rounds[3].lines)["train"]
    assert rounds[3].stages == {"sample/3": "to run", "judge/3": "to run", "train/3": "to run", "evaluate/3": "to run"}
    assert all(s == "done" for r in rounds[:3] for s in r.stages.values())
    assert "2 iteration(s) + 1 from spa expand" in format_plan(cfg, rounds)


def test_cli_prints_json_and_refuses_a_bad_config(tmp_path, inline_run):
    _, path, _ = inline_run
    spa = str(Path(sys.executable).parent / "spa")
    res = subprocess.run([spa, "plan", str(path), "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert [r["t"] for r in rows] == [0, 1, 2] and rows[2]["stages"]["train/2"] == "done"
    res = subprocess.run([spa, "plan", str(path), "-s", "train.beta=-1"], capture_output=True, text=True)
    assert res.returncode == 2 and "beta" in res.stderr


def test_an_edited_source_reruns_prepare(tmp_path, prefs_file, tiny_model_dir):
    source = tmp_path / "prefs.jsonl"
    shutil.copy(prefs_file, source)
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, source)
    prepare.run(cfg)
    assert plan(cfg)[0].stages["prepare"] == "done"
    text = source.read_text()
    source.write_text(text + text.splitlines()[0] + "\n")  # one more row: same path and config, new content
    status = {k: v for r in plan(cfg) for k, v in r.stages.items()}
    assert status["prepare"] == "reruns (the source changed)"
    assert status["seed"] == "to run"
