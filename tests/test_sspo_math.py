"""SSPO's pure functions (spa/training/sspo.py) against values computed by hand."""

import math

import pytest
import torch

from spa.training import sspo


def test_simpo_reward_is_the_length_averaged_log_prob_times_beta():
    r = sspo.simpo_reward(torch.tensor([-20.0, -6.0]), torch.tensor([10, 3]), beta=10.0)
    assert r.tolist() == pytest.approx([-20.0, -20.0])


def test_gold_pair_loss_by_hand():
    # r_w - r_l - Delta = 3 - 1 - 2 = 0 -> -log sigmoid(0) = log 2; second pair: 5 - 1 - 2 = 2
    loss = sspo.gold_pair_loss(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0]), margin=2.0)
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2)


def test_ema_starts_at_the_first_value_then_moves_by_the_momentum():
    assert sspo.ema(None, 4.0, 0.95) == 4.0
    assert sspo.ema(4.0, 2.0, 0.95) == pytest.approx(0.95 * 4 + 0.05 * 2)


def test_normalise_clips_at_five_deviations():
    z = sspo.normalise(torch.tensor([1.0, 3.0, 100.0, -100.0]), mu=1.0, sigma=2.0)
    assert z.tolist() == [0.0, 1.0, 5.0, -5.0]


def test_silverman_bandwidth_by_hand_and_its_floor():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(2.5)  # unbiased variance of 0..4
    iqr = 3.0 - 1.0
    assert sspo.silverman_bandwidth(x) == pytest.approx(0.9 * min(sd, iqr / 1.34) * 5 ** -0.2)
    assert sspo.silverman_bandwidth(torch.tensor([2.0, 2.0, 2.0])) == sspo.BANDWIDTH_FLOOR
    assert sspo.silverman_bandwidth(torch.tensor([1.0])) == sspo.BANDWIDTH_FLOOR


def test_kde_cdf_is_the_mean_of_normal_cdfs():
    cdf = sspo.kde_cdf(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0]), bandwidth=1.0)
    phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    assert cdf.tolist() == pytest.approx([(0.5 + phi(-2)) / 2, (phi(1) + phi(-1)) / 2])


def _normal_sample(mean: float, n: int = 2000) -> torch.Tensor:
    """Deterministic quantiles of N(mean, 1): a sample whose KDE is the normal smoothed by the bandwidth."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return mean + math.sqrt(2) * torch.erfinv(2 * q - 1)


@pytest.mark.parametrize("prior", [0.5, 0.8, 0.3])
def test_bayes_threshold_of_two_known_gaussians(prior):
    """Chosen ~ N(1, 1), rejected ~ N(-1, 1): minimising p CDF_w(d) + (1-p)(1 - CDF_l(d)) means
    p f_w(d) = (1-p) f_l(d); with both densities of variance v (1 + h^2 after the kernel's smoothing),
    d = -(v / 2) log(p / (1-p)): 0 at equal priors, -0.72 at p = 0.8."""
    w, lo = _normal_sample(1.0), _normal_sample(-1.0)
    h = sspo.silverman_bandwidth(w)
    v = 1.0 + h * h
    expected = -(v / 2) * math.log(prior / (1 - prior))
    assert sspo.bayes_threshold(w, lo, prior=prior, grid_points=2001) == pytest.approx(expected, abs=0.02)


def test_min_chosen_threshold_and_pseudo_labels():
    assert sspo.min_chosen_threshold(torch.tensor([0.3, -0.2, 1.0])) == pytest.approx(-0.2)
    assert sspo.pseudo_labels(torch.tensor([-1.0, 0.5, 0.5001, 2.0]), 0.5).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_unpaired_loss_by_hand():
    """z = [2, -1], delta 0.5, beta 2, prior 0.8: the first is winning (weight 0.8, -log sigmoid(3)), the
    second losing (weight 0.2, -log sigmoid(3))."""
    loss = sspo.unpaired_loss(torch.tensor([2.0, -1.0]), delta=0.5, beta=2.0, prior=0.8)
    nls3 = math.log(1 + math.exp(-3))
    assert loss.item() == pytest.approx((0.8 * nls3 + 0.2 * nls3) / 2)
    z = torch.tensor([2.0, -1.0], requires_grad=True)
    sspo.unpaired_loss(z, delta=0.5, beta=2.0, prior=0.8).backward()
    assert z.grad[0] < 0 < z.grad[1]  # the winner pushed up, the loser down


def test_curriculum_decays_to_the_gold_share():
    assert sspo.curriculum_weight(0, decay=0.01, g_min=0.1) == 1.0
    assert sspo.curriculum_weight(100, decay=0.01, g_min=0.1) == pytest.approx(math.exp(-1))
    assert sspo.curriculum_weight(1000, decay=0.01, g_min=0.1) == 0.1
    assert sspo.sspo_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(3.5)


def test_state_settles_its_threshold_between_the_classes_and_survives_a_checkpoint():
    torch.manual_seed(0)
    state = sspo.SSPOState(min_pairs=8)
    deltas = []
    for step in range(200):
        w, lo = torch.randn(4) + 1.0, torch.randn(4) - 1.0
        unpaired = torch.randn(16)
        out = state.update(torch.cat([w, lo, unpaired]), w, lo)
        assert bool(out["threshold_updated"]) == (step >= 1)  # 8 pairs queued from the second step on
        deltas.append(out["delta"])
    # rewards: mean about 0 and deviation about 1.1 overall, so the Bayes point of the normalised classes is near 0
    assert abs(deltas[-1]) < 0.25 and abs(deltas[-1] - deltas[-20]) < 0.1
    copy = sspo.SSPOState(min_pairs=8)
    copy.load_state_dict(state.state_dict())
    w, lo = torch.tensor([1.0] * 4), torch.tensor([-1.0] * 4)
    assert copy.update(torch.cat([w, lo]), w, lo) == state.update(torch.cat([w, lo]), w, lo)


def test_a_step_of_equal_rewards_moves_nothing():
    """DPO's implicit reward at the first step is 0 everywhere (the policy is the reference): the statistics stay
    unset and no gold margin is queued; the next step's rewards set them, with a real spread."""
    state = sspo.SSPOState(min_pairs=2)
    zeros = torch.zeros(6)
    assert state.update(zeros, zeros[:2], zeros[2:4]) == {"mu": None, "sigma": None, "delta": 0.0,
                                                         "threshold_updated": 0.0}
    assert not state.queue
    w, lo = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0])
    out = state.update(torch.cat([w, lo]), w, lo)
    assert out["mu"] == pytest.approx(0.5) and out["sigma"] == pytest.approx(math.sqrt(1.25)) and len(state.queue) == 1


def test_pseudo_label_accuracy_against_the_oracles_median():
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])
    scores = torch.tensor([0.9, 0.1, 0.2, 0.8])  # median (0.2 + 0.8) / 2 = 0.5: good = [1, 0, 0, 1]
    assert sspo.pseudo_label_accuracy(labels, scores) == pytest.approx(0.5)
