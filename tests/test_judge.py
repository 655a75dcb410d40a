import math

import pytest
import torch

from spa.judges.implicit_reward import assign_labels, implicit_preference, implicit_reward


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_eq7_hand_value_against_reference():
    # r1 = 0.1*(-10 - -12) = 0.2 ; r2 = 0.1*(-20 - -19) = -0.1 ; p = sigma(0.3)
    p = implicit_preference(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-20.0]),
                            torch.tensor([-19.0]), beta=0.1)
    assert p.item() == pytest.approx(sig(0.3), abs=1e-12)
    assert p.dtype == torch.float64


def test_reference_free_variant():
    # r = beta*log pi: sigma(0.1*(-10) - 0.1*(-20)) = sigma(1.0)
    p = implicit_preference(torch.tensor([-10.0]), None, torch.tensor([-20.0]), None, beta=0.1)
    assert p.item() == pytest.approx(sig(1.0), abs=1e-12)


def test_length_penalty_eq13_can_flip_the_label():
    pol1, ref1, pol2, ref2 = (torch.tensor([v]) for v in (-10.0, -12.0, -20.0, -19.0))
    # without penalty y1 wins (margin 0.3); y1 is 100 tokens longer: 0.3 - 0.01*100 = -0.7
    p = implicit_preference(pol1, ref1, pol2, ref2, beta=0.1, length_penalty=0.01,
                            len_1=torch.tensor([150]), len_2=torch.tensor([50]))
    assert p.item() == pytest.approx(sig(-0.7), abs=1e-12)
    first_wins, tie = assign_labels(p)
    assert not first_wins.item() and not tie.item()


def test_length_penalty_needs_lengths():
    with pytest.raises(ValueError, match="lengths"):
        implicit_preference(torch.tensor([0.0]), None, torch.tensor([0.0]), None, beta=0.1, length_penalty=0.01)


def test_identical_responses_are_an_exact_tie():
    p = implicit_preference(torch.tensor([-5.0, -3.0]), torch.tensor([-6.0, -3.0]),
                            torch.tensor([-5.0, -4.0]), torch.tensor([-6.0, -4.0]), beta=0.1)
    first_wins, tie = assign_labels(p)
    assert p[0].item() == 0.5 and tie.tolist() == [True, True] and first_wins.tolist() == [False, False]


def test_reference_must_be_given_for_both_or_neither():
    with pytest.raises(ValueError, match="both"):
        implicit_preference(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), None, beta=0.1)


def test_implicit_reward_is_eq4():
    assert implicit_reward(torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5).item() == pytest.approx(1.0)
