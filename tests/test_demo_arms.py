"""`spa.demo.arms.run_arm`: an arm is a copy of a finished seed stage plus its iterations; `resume=True`
keeps an earlier attempt (the benchmarks' `--resume`) and reruns only the stages it changes."""

from __future__ import annotations

from pathlib import Path

from spa.run.manifest import Manifest


def _finished(run: Path) -> dict[str, tuple[float, dict]]:
    """Each finished stage's wall time and output hashes: a rerun stage gets new ones."""
    return {key: (entry["wall_time_s"], entry["finished_at"], entry["outputs"])
            for key, entry in Manifest(run / "manifest.json").entries().items()}


def test_run_arm_resume_keeps_finished_stages_and_reruns_a_changed_one(tmp_path):
    import dataclasses

    from spa.demo.arms import NO_REFINE, quiet, run_arm, run_seed_stage
    from spa.demo.run import SMALL, build_world, demo_config

    sizes = dataclasses.replace(SMALL, iterations=1, sft_demos=100, seed_pairs=32, prompts_per_iteration=32,
                                heldout_pairs=12, eval_prompts=24)  # the trackers test's world, one round
    world = build_world(tmp_path / "world", sizes=sizes, echo=quiet)
    raw = demo_config(world, tmp_path / "base", sizes=sizes)
    base = Path(run_seed_stage(raw, echo=quiet).run_dir)
    arm = tmp_path / "arm"

    first = run_arm(base, arm, raw, NO_REFINE)
    assert [r["iteration"] for r in first] == [0, 1]
    done = _finished(arm)
    assert {"prepare", "seed", "evaluate/0", "sample/1", "judge/1", "train/1", "evaluate/1"} == set(done)
    marker = arm / "left_by_an_earlier_attempt"
    marker.write_text("x")

    # resumed with the same arm: nothing reruns, the same numbers come back, the directory is kept
    again = run_arm(base, arm, raw, NO_REFINE, resume=True)
    assert again == first and _finished(arm) == done and marker.exists()

    # resumed with a changed judge: the judge and everything after it rerun, sampling does not
    changed = run_arm(base, arm, raw, {**NO_REFINE, "judge.flip_fraction": 0.5}, resume=True)
    after = _finished(arm)
    rerun = {key for key in done if after[key] != done[key]}
    assert rerun == {"judge/1", "train/1", "evaluate/1"}
    assert after["judge/1"][2] != done["judge/1"][2]  # half the labels flipped: other judgments
    assert changed[0] == first[0]

    # without resume the arm starts again from a fresh copy of the base run
    run_arm(base, arm, raw, NO_REFINE)
    assert not marker.exists()
