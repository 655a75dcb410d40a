"""Label and refinement diagnostics (spa/judges/diagnostics.py) against hand-counted values."""

import pytest
import torch

from spa.judges.diagnostics import (
    flag_precision,
    judge_length_preference,
    oracle_label_quality,
    refinement_diagnostics,
)
from spa.judges.implicit_reward import auto_length_penalty, select_pairs


def test_judge_shorter_wins_counts_only_unequal_pairs():
    # chosen shorter, chosen longer, equal, chosen shorter
    out = judge_length_preference([3, 7, 5, 2], [4, 6, 5, 9])
    assert out == {"judge_shorter_wins": pytest.approx(2 / 3), "unequal_length_pairs": 3}
    assert judge_length_preference([5], [5])["judge_shorter_wins"] is None


def test_oracle_label_quality_by_hand():
    # verdicts: agree, disagree, undecided, agree
    out = oracle_label_quality([1.0, 2.0, 1.5, 1.0], [3, 7, 5, 4], [4, 6, 2, 4])
    assert out["self_label_accuracy"] == pytest.approx(2 / 3)
    assert out["noise_rate"] == pytest.approx(1 / 3)
    assert out["oracle_decided_pairs"] == 3
    # decided and unequal: pair 0 (oracle's winner = chosen, 3 < 4: shorter), pair 1 (winner = rejected, 6 < 7:
    # shorter); pair 3 has equal lengths, pair 2 is undecided
    assert out["oracle_shorter_wins"] == 1.0


def test_flag_precision_lift_over_the_base_rate():
    out = flag_precision([True, True, False, False, False, True], [True, False, True, False, False, True])
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    assert out["base_rate"] == pytest.approx(0.5) and out["lift"] == pytest.approx(4 / 3)
    assert flag_precision([False, False], [True, False])["precision"] is None


def test_refinement_diagnostics_leave_out_the_warmup_and_undecided_pairs():
    steps = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # 5 steps, warm-up 0.2 -> step 0 left out
    z_sr = [True, True, True, False, False, False, True, False, False, False]
    z_dnd = [True, False, True, False, True, False, False, False, False, False]
    flipped = [True, False, True, False, False, False, True, False, False, True]
    wrong = [True, None, True, None, False, False, False, True, False, False]
    out = refinement_diagnostics(steps, z_sr, z_dnd, 0.2, flipped, wrong)
    assert out["flag_samples"] == 8
    assert out["sr_flagged_share"] == pytest.approx(2 / 8) and out["dnd_flagged_share"] == pytest.approx(2 / 8)
    # active rows 2..9: sr flags rows 2, 6; dnd flags rows 2, 4 -> they disagree on rows 4 and 6
    assert out["sr_dnd_disagreement"] == pytest.approx(2 / 8)
    assert out["flip_rate"] == pytest.approx(3 / 8)  # rows 2, 6, 9
    assert out["sr_flip_precision"] == 1.0 and out["dnd_flip_precision"] == pytest.approx(0.5)
    # oracle known on active rows 2, 4..9 (row 3 undecided): wrong rows 2, 7 -> noise 2/7
    assert out["noise_rate"] == pytest.approx(2 / 7)
    assert out["sr_precision"] == pytest.approx(0.5) and out["sr_recall"] == pytest.approx(0.5)
    assert out["dnd_precision"] == pytest.approx(0.5)
    # DND off and no flips: no DND keys, no flip keys
    off = refinement_diagnostics(steps, z_sr, None, 0.2, [False] * 10)
    assert "dnd_flagged_share" not in off and "sr_dnd_disagreement" not in off and "flip_rate" not in off


def _gap(rewards, lengths, a):
    c, r = select_pairs(rewards, lengths, a)
    idx = torch.arange(len(c))
    return float((lengths[idx, c] - lengths[idx, r]).mean())


def test_signed_length_penalty_corrects_a_judge_that_favours_short_answers():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(3, 30, (60, 2), generator=gen).double()
    rewards = -0.05 * lengths + 0.3 * torch.randn(60, 2, generator=gen)  # the judge favours short answers
    assert _gap(rewards, lengths, 0.0) < 0
    assert auto_length_penalty(rewards, lengths) == 0.0  # Eq. 13's a >= 0 cannot help
    a = auto_length_penalty(rewards, lengths, signed=True)
    assert a < 0
    grid_best = min(abs(_gap(rewards, lengths, -k * 1e-3)) for k in range(0, 400))
    assert abs(_gap(rewards, lengths, a)) <= grid_best + 1e-9 < abs(_gap(rewards, lengths, 0.0))
    # leaning the other way, signed and unsigned agree
    assert auto_length_penalty(-rewards, lengths, signed=True) == auto_length_penalty(-rewards, lengths) > 0
