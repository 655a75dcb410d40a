"""The variants' math (docs/variants.md) against hand-computed values and an LP solver."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spa.judges.implicit_reward import auto_length_penalty, select_pairs
from spa.training.losses import (
    dro_diagnostics,
    dro_dpo_loss,
    dro_moved_share,
    dro_weights,
    refined_dpo_loss,
    rpo_loss,
)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_rpo_two_by_two_by_hand():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -2.0])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # orthogonal prompts: cosine distance 1 off the diagonal
    # lw = [0.5, 0], ll = [-0.5, 1] -> diff = [[1, -0.5], [0.5, -1]]
    # w rows = softmax([0, -2]/...) with tau 0.5: distances [[0, 1], [1, 0]] -> exp(0) vs exp(-2)
    near, far = 1 / (1 + math.exp(-2)), math.exp(-2) / (1 + math.exp(-2))
    s = [0.1 * near * 1.0, 0.1 * far * -0.5, 0.1 * far * 0.5, 0.1 * near * -1.0]
    expected = -sum(_logsig(v) for v in s) / 4
    got = rpo_loss(pc, pr, rc, rr, emb, emb, beta=0.1, tau=0.5)
    assert got.item() == pytest.approx(expected, abs=1e-7)
    # with SR: pair 0 flagged -> every entry of row 0 and column 0 uses Eq. 10
    z = torch.tensor([1.0, 0.0])
    zs = [1, 1, 1, 0]
    a = 0.1
    expected_sr = -sum((1 - a * zz) * _logsig(v) + a * zz * _logsig(-v) for v, zz in zip(s, zs, strict=True)) / 4
    got_sr = rpo_loss(pc, pr, rc, rr, emb, emb, beta=0.1, tau=0.5, z_chosen=z, z_rejected=z, alpha=a)
    assert got_sr.item() == pytest.approx(expected_sr, abs=1e-7)


def test_rpo_unpaired_shapes_and_group_of_one_is_dpo():
    torch.manual_seed(0)
    pc, rc, emb_c = torch.randn(3), torch.randn(3), torch.randn(3, 5)
    pr, rr, emb_r = torch.randn(5), torch.randn(5), torch.randn(5, 5)
    out = rpo_loss(pc, pr, rc, rr, emb_c, emb_r, beta=0.1, tau=0.5)  # M = 3 winners, N = 5 losers
    assert out.shape == () and torch.isfinite(out)
    one = rpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], emb_c[:1], emb_r[:1], beta=0.1, tau=0.5)
    dpo = -torch.nn.functional.logsigmoid(0.1 * ((pc[0] - rc[0]) - (pr[0] - rr[0])))
    assert one.item() == pytest.approx(dpo.item(), abs=1e-7)


def test_dro_weights_by_hand():
    # budget N*eps = 0.15: xi=0.2 moves fully (cost 0.1), xi=0.5 moves 0.05/0.4 = 1/8, xi=0.9 stays
    w = dro_weights(torch.tensor([0.5, 0.2, 0.9]), eps=0.05, xi_min=0.1)
    assert w.tolist() == pytest.approx([0.875 + 0.125 * 5, 2.0, 1.0])
    # outside the support (xi <= xi_min) keeps weight 1 and costs no budget
    w = dro_weights(torch.tensor([0.05, 0.3]), eps=0.05, xi_min=0.1)
    assert w.tolist() == pytest.approx([1.0, 0.5 + 0.5 * 3])


def test_dro_moved_share_by_hand():
    # the plan behind the weights above: xi=0.2 moves all its mass, xi=0.5 an eighth, xi=0.9 none
    assert dro_moved_share(torch.tensor([0.5, 0.2, 0.9]), eps=0.05, xi_min=0.1).tolist() == pytest.approx([0.125, 1.0, 0.0])
    # nothing moves outside the support, and a zero radius moves nothing
    assert dro_moved_share(torch.tensor([0.05, 0.3]), eps=0.05, xi_min=0.1).tolist() == pytest.approx([0.0, 0.5])
    assert dro_moved_share(torch.tensor([0.5, 0.2]), eps=0.0, xi_min=0.1).tolist() == [0.0, 0.0]
    assert dro_diagnostics(torch.tensor([0.5, 0.2, 0.9]), eps=0.05, xi_min=0.1) == pytest.approx(
        {"dro_max_weight": 2.0, "dro_group_size": 3.0, "dro_moved_fraction": 1.125 / 3})


def _lp_worst_case(xi: np.ndarray, eps: float, xi_min: float) -> float:
    """sup E_Q[-log xi] over the W1 ball on [xi_min, 1], as an LP over transport plans to a grid."""
    from scipy.optimize import linprog

    grid = np.unique(np.concatenate([np.linspace(xi_min, 1.0, 201), xi[xi >= xi_min], [xi_min]]))
    n, g = len(xi), len(grid)
    gain = -np.log(grid)
    c = -np.tile(gain, n) / n  # maximise sum_ij pi_ij l(g_j) (pi in units of 1/N)
    cost = np.abs(xi[:, None] - grid[None, :]).ravel() / n
    a_eq = np.zeros((n, n * g))
    for i in range(n):
        a_eq[i, i * g:(i + 1) * g] = 1.0
    res = linprog(c, A_ub=cost[None, :], b_ub=[eps], A_eq=a_eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0
    return -res.fun


@pytest.mark.parametrize("seed", range(6))
def test_dro_closed_form_matches_the_lp(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 12))
    xi = rng.uniform(0.12, 0.99, n)
    eps, xi_min = float(rng.choice([0.005, 0.01, 0.05, 0.2])), 0.1
    w = dro_weights(torch.tensor(xi), eps=eps, xi_min=xi_min).numpy()
    p = (w - 1) / (xi / xi_min - 1)  # the moved share, from w = (1-p) + p*xi/xi_min
    closed = float(np.mean((1 - p) * -np.log(xi) + p * -np.log(xi_min)))
    assert closed == pytest.approx(_lp_worst_case(xi, eps, xi_min), rel=1e-6, abs=1e-9)
    assert float(np.sum(p * (xi - xi_min))) == pytest.approx(min(n * eps, float(np.sum(xi - xi_min))), rel=1e-9)


def test_dro_loss_variants():
    margin = torch.tensor([-1.0, 0.2, 2.0], requires_grad=True)
    plain = dro_dpo_loss(margin, eps=0.05, xi_min=0.1)
    w = dro_weights(torch.sigmoid(margin.detach()), 0.05, 0.1)
    assert plain.detach().tolist() == pytest.approx((w * -torch.nn.functional.logsigmoid(margin.detach())).tolist())
    plain.sum().backward()  # weights are constants: the gradient is w_i * d(-logsigmoid)
    assert margin.grad.tolist() == pytest.approx((-w * torch.sigmoid(-margin.detach())).tolist())
    z = torch.tensor([1.0, 0.0, 0.0])
    sr = dro_dpo_loss(margin.detach(), eps=0.05, xi_min=0.1, z=z, alpha=0.1)
    assert sr[0].item() == pytest.approx(refined_dpo_loss(margin.detach()[:1], z[:1], 0.1).item())
    w_rest = dro_weights(torch.sigmoid(margin.detach()[1:]), 0.05, 0.1)  # weights over the unflagged pairs only
    assert sr[1:].tolist() == pytest.approx((w_rest * -torch.nn.functional.logsigmoid(margin.detach()[1:])).tolist())


def test_select_pairs_best_vs_worst_with_length_penalty():
    rewards = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3]])
    lengths = torch.tensor([[10, 100, 20, 5], [1, 2, 3, 4]])
    c, r = select_pairs(rewards, lengths)
    assert c.tolist() == [1, 0] and r.tolist() == [0, 0]  # second prompt: all equal -> tie (same index)
    # a = 0.01: scores [0.0, -0.1, 0.3, 0.15] -> best 2, worst 1
    c, r = select_pairs(rewards[:1], lengths[:1], length_penalty=0.01)
    assert c.tolist() == [2] and r.tolist() == [1]


def test_auto_length_penalty_is_at_least_as_good_as_dices_grid():
    gen = torch.Generator().manual_seed(0)
    for trial in range(5):
        lengths = torch.randint(5, 200, (40, 6), generator=gen).double()
        rewards = 0.01 * lengths + torch.randn(40, 6, generator=gen)  # reward correlated with length
        a = auto_length_penalty(rewards, lengths)
        assert a >= 0

        def gap(x, rewards=rewards, lengths=lengths):
            c, r = select_pairs(rewards, lengths, x)
            idx = torch.arange(40)
            return abs(float((lengths[idx, c] - lengths[idx, r]).mean()))

        grid_best = min(gap(k * 1e-3) for k in range(0, 400))
        assert gap(a) <= grid_best + 1e-9, trial
    # no length gap to remove: 0
    same = torch.full((3, 4), 7.0)
    assert auto_length_penalty(torch.randn(3, 4, generator=gen), same) == 0.0
