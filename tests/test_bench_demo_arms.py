"""The demo bench's tables: the paired numbers the README quotes are computed as stated (by hand here)."""

from __future__ import annotations

from conftest import bench_module


def _bench():
    return bench_module("demo_arms")


def _rows(*wins, flip=None, prec=None):
    return [{"win_rate": w, "flip_rate": flip, "sr_flip_precision": prec, "dnd_flip_precision": prec}
            for w in wins]


def test_noise_table_pairs_each_arms_loss_with_iterative_dpos_on_the_same_seed():
    bench = _bench()
    # seed 0: DPO 60 -> 58 under flips (loses 2), SPA 59 -> 58 (loses 1): SPA loses 1 less (-1)
    # seed 1: DPO 50 -> 55 (loses -5), SPA 52 -> 54 (loses -2): SPA loses 3 more (+3)
    results = {
        0: {"iterative_dpo": _rows(55, 60), "iterative_dpo_flip20": _rows(55, 58, flip=0.2, prec=0.5),
            "spa": _rows(55, 59), "spa_flip20": _rows(55, 58, flip=0.2, prec=0.6)},
        1: {"iterative_dpo": _rows(50, 50), "iterative_dpo_flip20": _rows(50, 55, flip=0.2, prec=0.5),
            "spa": _rows(50, 52), "spa_flip20": _rows(50, 54, flip=0.2, prec=0.4)},
    }
    lines = bench.noise_table(results).splitlines()[2:]
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines}
    assert set(cells) == {"iterative_dpo", "spa"}
    _, rate, final, loss, vs_dpo, sr, *_ = cells["spa"]
    assert (rate, final, loss, vs_dpo) == ("20%", "56.0 ± 2.8", "-0.5 ± 2.1", "1.0 ± 2.8")
    assert sr == "0.50 ± 0.14"  # SR's precision on flips at t = 1 over the two seeds
    assert cells["iterative_dpo"][4] == "-"  # no pairing with itself


def test_every_declared_arm_is_a_known_override_and_the_slower_arm_is_the_flip_scaled_rate():
    bench = _bench()
    jobs = bench.arm_jobs()
    assert jobs["spa_alpha05"] == {"train.refinement.alpha": 0.5}  # the paper's K, five times its alpha
    assert jobs["spa_alpha05_flip20"] == {"train.refinement.alpha": 0.5, "judge.flip_fraction": 0.2}
    from pathlib import Path

    from spa.demo.run import demo_config

    demo_lr = demo_config(Path("world"), Path("run"))["train"]["learning_rate"]
    assert abs(jobs["iterative_dpo_lr06"]["train.learning_rate"] - 0.6 * demo_lr) < 1e-12  # 20% flips: 1 - 2 * 0.2
    assert jobs["iterative_dpo_lr06"]["train.refinement.self_refine"] is False
    assert jobs["iterative_dpo_prevref"]["judge.reference"] == "previous"
    assert jobs["spa_ep3_flip20"] == {"train.epochs": 3, "judge.flip_fraction": 0.2}


def test_three_epoch_arms_are_paired_with_three_epoch_iterative_dpo():
    bench = _bench()
    assert bench.baseline("spa_ep3") == "iterative_dpo_ep3" and bench.baseline("spa_alpha05") == "iterative_dpo"
    results = {s: {"iterative_dpo": _rows(50, 60), "iterative_dpo_flip20": _rows(50, 60, flip=0.2, prec=0.5),
                   "iterative_dpo_ep3": _rows(50, 62), "iterative_dpo_ep3_flip20": _rows(50, 56 + s, flip=0.2, prec=0.5),
                   "spa_ep3": _rows(50, 61), "spa_ep3_flip20": _rows(50, 59 + s, flip=0.2, prec=0.7)} for s in (0, 2)}
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in bench.noise_table(results).splitlines()[2:]}
    # spa_ep3 loses 2 and 0, iterative_dpo_ep3 loses 6 and 4: paired -4 both times (not against 1-epoch DPO's 0)
    assert cells["spa_ep3"][3:5] == ["1.0 ± 1.4", "-4.0 ± 0.0"]
