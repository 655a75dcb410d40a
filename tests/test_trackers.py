"""Experiment trackers (`train.report_to`, spa/run/trackers.py) and `spa push` (spa/run/push.py). No network."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from spa.config import parse_config
from spa.run import trackers

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

runner = CliRunner()
ITERATIONS = 2


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """The demo world (below its small size), seed stage + 2 iterations in this process, report_to: [tensorboard]."""
    import contextlib
    import io

    from spa.demo.arms import run_iterations, run_seed_stage
    from spa.demo.run import SMALL, build_world, demo_config

    root = tmp_path_factory.mktemp("trackers")
    sizes = dataclasses.replace(SMALL, iterations=ITERATIONS, sft_demos=100, seed_pairs=32, prompts_per_iteration=32,
                                heldout_pairs=12, eval_prompts=24)  # smaller still: ~20 s of CPU in all
    world = build_world(root / "world", sizes=sizes, echo=lambda _m: None)
    raw = demo_config(world, root / "run", sizes=sizes)
    raw["train"]["report_to"] = ["tensorboard"]
    lines: list[str] = []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cfg = run_iterations(run_seed_stage(raw, echo=lines.append), echo=lines.append)
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return cfg, raw, config, lines, out.getvalue()


def test_tensorboard_holds_every_iterations_training_and_stage_scalars(tracked_run):
    cfg, _, _, lines, printed = tracked_run
    run = Path(cfg.run_dir)
    logs = run / "logs" / "trackers"
    assert sorted(p.name for p in logs.iterdir()) == [f"iter_{t}" for t in range(ITERATIONS + 1)]
    assert not list(run.rglob("checkpoints/runs"))  # not transformers' default place
    for t in range(ITERATIONS + 1):
        got = _scalars(logs / f"iter_{t}")
        rows = pq.read_table(run / f"iter_{t}" / "train_log.parquet").to_pylist()
        # one event per optimiser step (Trainer's own log of the step carries ours), train_log's numbers
        for tag, column in (("train/loss", "loss"), ("train/learning_rate", "lr"),
                            ("train/refined_fraction", "refined_fraction"), ("train/rewards/margins", "margin_mean")):
            assert [s for s, _ in got[tag]] == [r["step"] for r in rows], tag
            assert [v for _, v in got[tag]] == pytest.approx([r[column] for r in rows], rel=1e-5, abs=1e-7), tag
        assert "train/grad_norm" in got
        evaluation = json.loads((run / f"iter_{t}" / "eval.json").read_text())
        assert got["eval/win_rate"] == [(t, pytest.approx(evaluation["win_rate"]))]
        assert got["eval/gold_agreement"] == [(t, pytest.approx(evaluation["gold_agreement"]))]
        if t:
            judged = json.loads((run / f"iter_{t}" / "judge_summary.json").read_text())
            assert got["judge/self_label_accuracy"] == [(t, pytest.approx(judged["self_label_accuracy"]))]
            assert got["judge/pairs"] == [(t, judged["pairs"])]
            assert len(got["train/tau"]) == len(rows)  # the refinement window's threshold, refined rounds only
        else:
            assert not any(tag.startswith("judge/") for tag in got)
    assert not any("warning" in line for line in lines)
    assert "{'loss'" not in printed and "'rewards/margins'" not in printed  # the trainer's log dicts stay quiet


def test_report_to_changes_no_resume_key(tracked_run):
    """Trackers only watch: without them (or with others) every stage of the finished run stays done."""
    from spa.stages import train
    from spa_tasks.plan import plan

    cfg, raw, _, _, _ = tracked_run
    for report_to in ([], ["tensorboard", "wandb"]):
        other = parse_config(raw | {"train": raw["train"] | {"report_to": report_to}})
        assert other.section_hash("train", "model", "judge") == cfg.section_hash("train", "model", "judge")
        assert all(s == "done" for r in plan(other) for s in r.stages.values()), plan(other)
    assert train.run(parse_config(raw | {"train": raw["train"] | {"report_to": []}}), 1).skipped


def test_report_to_names_are_checked():
    base = {"run_dir": "r", "model": {"pi_init": "m"}}
    for bad in (["all"], ["none"], ["Tensor Board"], ["tensorboard", "tensorboard"]):
        with pytest.raises(ValueError, match="report_to"):
            parse_config(base | {"train": {"report_to": bad}})
    assert parse_config(base).train.report_to == []
    assert "train.report_to" in __import__("spa.config", fromlist=["OPERATIONAL"]).OPERATIONAL


def test_trackers_unknown_or_missing_are_left_out_with_one_line():
    warned: list[str] = []
    assert trackers.usable(["tensorboard", "nosuchtracker"], warned.append) == ["tensorboard"]
    assert len(warned) == 1 and "nosuchtracker" in warned[0]


def test_summary_logger_writes_tensorboard_and_never_fails_a_stage(tmp_path, monkeypatch):
    summary = {"iteration": 2, "win_rate": 61.5, "n": 40, "annotator": "python:x:y", "lc_win_rate": None,
               "subset": True, "mt_bench": {"score": 7.5, "note": "text"}}
    lines: list[str] = []
    assert trackers.log_summary(["tensorboard", "comet_ml"], tmp_path, 2, "eval", summary, lines.append) == [
        "tensorboard"]
    assert len(lines) == 1 and "comet_ml" in lines[0]
    got = _scalars(trackers.tracker_dir(tmp_path, 2))
    assert got == {"eval/win_rate": [(2, 61.5)], "eval/n": [(2, 40.0)], "eval/mt_bench/score": [(2, 7.5)]}

    def broken(*_args):
        raise RuntimeError("https://user:pw@tracker.example/api refused hf_abcdefghijklmnop\nmore")

    monkeypatch.setitem(trackers._LOGGERS, "tensorboard", broken)
    lines.clear()
    assert trackers.log_summary(["tensorboard"], tmp_path, 2, "judge", {"pairs": 3}, lines.append) == []
    assert len(lines) == 1 and "RuntimeError" in lines[0]
    assert "pw@" not in lines[0] and "abcdefghijklmnop" not in lines[0] and "more" not in lines[0]
    assert trackers.run_name(tmp_path / "my-run", 3) == "my-run-t3"


# --- spa push ---


class _NoHub:
    def __init__(self, *args, **kwargs):
        raise AssertionError("spa push reached for the hub")


def test_push_dry_run_lists_the_files_and_reaches_no_hub(tracked_run, monkeypatch):
    import huggingface_hub

    from spa_tasks.cli import app

    cfg, _, config, _, _ = tracked_run
    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    res = runner.invoke(app, ["push", "1", str(config), "--repo-id", "my-org/spa-demo-t1", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "model.safetensors" in res.output and "README.md" in res.output and "config.json" in res.output
    assert ".spa_hashes.json" not in res.output and "nothing uploaded" in res.output
    size = (Path(cfg.run_dir) / "iter_1" / "model" / "model.safetensors").stat().st_size
    assert f"{size:,d}" in res.output
    res = runner.invoke(app, ["push", "0", "-c", str(config), "--repo-id", "my-org/seed", "--dry-run"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("args, words", [
    (["push", "7", "--repo-id", "org/name", "--dry-run"], "iteration 7 does not exist"),
    (["push", "1", "--repo-id", "no-org", "--dry-run"], "ORG/NAME"),
    (["push", "1", "--repo-id", "org/bad name"], "ORG/NAME"),
    (["push", "1", "--repo-id", "org/na--me"], "ORG/NAME"),
])
def test_push_bad_input_is_one_line_and_exit_2(tracked_run, monkeypatch, args, words):
    import huggingface_hub

    from spa_tasks.cli import app

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    res = runner.invoke(app, args[:2] + [str(tracked_run[2])] + args[2:])
    assert res.exit_code == 2, res.output
    assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_push_refuses_an_unfinished_model(tmp_path, tiny_model_dir, prefs_file):
    import shutil

    from conftest import tiny_config

    from spa_tasks.cli import app

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "iter_1" / "model")  # no manifest entry
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = runner.invoke(app, ["push", "1", str(config), "--repo-id", "org/name", "--dry-run"])
    assert res.exit_code == 2 and "not recorded as finished" in res.stderr, res.output


def test_push_uploads_with_the_environments_token_never_printed(tracked_run, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from spa_tasks.cli import app

    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def __init__(self, *args, **kwargs):
            assert not args and not kwargs  # the token is huggingface_hub's own business (HF_TOKEN / login)

        def __getattr__(self, name):
            return lambda *a, **kw: calls.append((name, {"args": a, **kw})) or "https://hub.example/commit/abc"

    secret = "hf_" + "s3cr3t" * 5
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: secret)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    res = runner.invoke(app, ["push", "2", str(tracked_run[2]), "--repo-id", "org/name", "--private",
                              "--revision", "iter-2"])
    assert res.exit_code == 0, res.output
    assert secret not in res.output and "https://hub.example/commit/abc" in res.output
    names = [name for name, _ in calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][1]["exist_ok"] and calls[0][1]["private"] and calls[1][1]["branch"] == "iter-2"
    up = calls[2][1]
    assert up["repo_id"] == "org/name" and up["revision"] == "iter-2" and Path(up["folder_path"]).name == "model"
    assert ".*" in up["ignore_patterns"]


def test_push_offline_or_without_token_is_one_line(tracked_run, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from spa_tasks.cli import app

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = runner.invoke(app, ["push", "1", str(tracked_run[2]), "--repo-id", "org/name"])
    assert res.exit_code == 2 and "HF_HUB_OFFLINE" in res.stderr, res.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = runner.invoke(app, ["push", "1", str(tracked_run[2]), "--repo-id", "org/name"])
    assert res.exit_code == 2 and "HF_TOKEN" in res.stderr, res.output
