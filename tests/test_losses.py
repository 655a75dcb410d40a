import math

import pytest
import torch

from spa.models.logprobs import gather_logps
from spa.training.losses import (
    RefinementWindow,
    dpo_margin,
    extrapolated_logps,
    percentile_threshold,
    refined_dpo_loss,
)


def test_dpo_margin_eq5_hand_value():
    # beta*(pc - rc) - beta*(pr - rr) = 0.1*(-1 + 2) - 0.1*(-3 + 2) = 0.2
    m = dpo_margin(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert m.item() == pytest.approx(0.2)


def test_refined_loss_eq10_hand_values():
    m = torch.tensor([0.2, 0.2, -1.0])
    z = torch.tensor([0, 1, 1])
    loss = refined_dpo_loss(m, z, alpha=0.1)
    # z=0: -log sigma(0.2) = log(1 + e^-0.2)
    assert loss[0].item() == pytest.approx(0.598138869, abs=1e-6)
    # z=1: -(0.9 log sigma(0.2) + 0.1 log sigma(-0.2)) = 0.9*0.598138869 + 0.1*0.798138869
    assert loss[1].item() == pytest.approx(0.618138869, abs=1e-6)
    # z=1, m=-1: 0.9*log(1+e) + 0.1*log(1+e^-1)
    assert loss[2].item() == pytest.approx(0.9 * 1.313261687 + 0.1 * 0.313261687, abs=1e-6)


def test_refined_loss_z_zero_is_plain_dpo_and_z_has_no_gradient():
    m = torch.randn(6, requires_grad=True)
    z = torch.zeros(6)
    assert torch.allclose(refined_dpo_loss(m, z, 0.1), -torch.nn.functional.logsigmoid(m))
    z1 = torch.ones(6, requires_grad=True)
    refined_dpo_loss(m, z1, 0.1).sum().backward()
    assert z1.grad is None and m.grad is not None


def test_refined_loss_alpha_half_flattens_the_gradient():
    # alpha = 0.5 with z = 1 is the symmetric loss: its gradient at m is -(0.5 - sigma(-m)) ... zero at m=0
    m = torch.zeros(1, requires_grad=True)
    refined_dpo_loss(m, torch.ones(1), 0.5).sum().backward()
    assert m.grad.item() == pytest.approx(0.0)


def test_dnd_lambda_schedule():
    """The paper's 1/2, 1/4, 1/8 for iterations 1-3, then 1/2**t; the config is the one home of it."""
    from spa.config import RefinementConfig

    lam = RefinementConfig().lam
    assert [lam(t) for t in (1, 2, 3, 4)] == [0.5, 0.25, 0.125, 0.0625]
    with pytest.raises(ValueError):
        lam(0)


def test_extrapolated_logps_eq12_hand_value():
    # h = 1.5*[0, 1] - 0.5*[1, 0] = [-0.5, 1.5]; log_softmax(h)[1] = -log(1 + e^-2)
    pol = torch.tensor([[[0.0, 1.0]]])
    ref = torch.tensor([[[1.0, 0.0]]])
    out = extrapolated_logps(pol, ref, torch.tensor([[1]]), torch.tensor([[True]]), lam=0.5)
    assert out.item() == pytest.approx(-math.log1p(math.exp(-2.0)), abs=1e-6)


def _dense(pol, ref, labels, mask, lam):
    h = (1 + lam) * pol - lam * ref
    lp = torch.log_softmax(h, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 7, 64])
def test_extrapolated_logps_matches_dense_at_any_chunk(chunk):
    g = torch.Generator().manual_seed(0)
    pol = torch.randn(3, 11, 37, generator=g)
    ref = torch.randn(3, 11, 37, generator=g)
    labels = torch.randint(0, 37, (3, 11), generator=g)
    mask = torch.rand(3, 11, generator=g) > 0.3
    labels[~mask] = -100  # ignored positions may hold any label
    got = extrapolated_logps(pol, ref, labels, mask, lam=0.25, chunk_size=chunk)
    want = _dense(pol, ref, labels, mask, 0.25)
    assert torch.allclose(got, want, atol=1e-5)


def test_extrapolated_logps_lam_zero_is_policy_logps_and_no_grad():
    g = torch.Generator().manual_seed(1)
    pol = torch.randn(2, 5, 9, generator=g, requires_grad=True)
    ref = torch.randn(2, 5, 9, generator=g)
    labels = torch.randint(0, 9, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = extrapolated_logps(pol, ref, labels, mask, lam=0.0, chunk_size=2)
    assert not out.requires_grad
    assert torch.allclose(out, gather_logps(pol.detach(), labels, mask), atol=1e-5)


def test_extrapolated_logps_shape_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        extrapolated_logps(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.long),
                           torch.ones(1, 2), 0.5)


def test_percentile_and_window_threshold():
    assert percentile_threshold(torch.arange(1.0, 11.0), 10.0).item() == pytest.approx(1.9)
    w = RefinementWindow(size=50, k_percent=10.0, warmup_fraction=0.2)
    assert w.tau is None
    w.update(torch.arange(1.0, 11.0))
    assert w.tau == pytest.approx(1.9)
    z = w.flags(torch.tensor([1.0, 1.95, 2.0, 5.0]), step=5, total_steps=10)
    assert z.tolist() == [True, False, False, False]


def test_window_keeps_only_the_most_recent_values():
    w = RefinementWindow(size=50, k_percent=10.0, warmup_fraction=0.2)
    w.update(torch.full((40,), -100.0))
    w.update(torch.arange(50.0))  # pushes all but the newest 50 out
    assert len(w) == 50
    assert w.tau == pytest.approx(torch.quantile(torch.arange(50.0), 0.1).item())


def test_window_warmup_flags_nothing_but_still_fills():
    w = RefinementWindow(size=4, k_percent=50.0, warmup_fraction=0.2)
    vals = torch.tensor([0.0, 1.0, 2.0, 3.0])
    w.update(vals)
    assert not w.flags(vals, step=0, total_steps=10).any()
    assert not w.flags(vals, step=1, total_steps=10).any()  # steps 0,1 are the first 20%
    assert w.flags(vals, step=2, total_steps=10).tolist() == [True, True, False, False]


def test_window_rejects_bad_arguments():
    with pytest.raises(ValueError):
        RefinementWindow(size=0, k_percent=10.0, warmup_fraction=0.2)
    with pytest.raises(ValueError):
        RefinementWindow(size=50, k_percent=101, warmup_fraction=0.2)
    with pytest.raises(ValueError):
        RefinementWindow(size=50, k_percent=10.0, warmup_fraction=1.5)


def test_decoupled_detection_flags_a_different_pair_than_sr():
    """DND (lam > 0, logit level) picks another least-confident pair than lam = 0, while
    extrapolating at the sequence level only rescales margins and picks the same one (docs/algorithm.md)."""
    g = torch.Generator().manual_seed(1)  # a fixed instance where the two rankings differ
    n, t, v, beta = 8, 6, 16, 0.1
    pol_w, pol_l = torch.randn(n, t, v, generator=g) * 3, torch.randn(n, t, v, generator=g) * 3
    ref_w, ref_l = torch.randn(n, t, v, generator=g) * 3, torch.randn(n, t, v, generator=g) * 3
    lab_w, lab_l = torch.randint(0, v, (n, t), generator=g), torch.randint(0, v, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)

    pc, pr = gather_logps(pol_w, lab_w, mask), gather_logps(pol_l, lab_l, mask)
    rc, rr = gather_logps(ref_w, lab_w, mask), gather_logps(ref_l, lab_l, mask)
    sr_conf = dpo_margin(pc, pr, rc, rr, beta)
    lam = 0.5
    tc = extrapolated_logps(pol_w, ref_w, lab_w, mask, lam)
    tr = extrapolated_logps(pol_l, ref_l, lab_l, mask, lam)
    dnd_conf = dpo_margin(tc, tr, rc, rr, beta)
    seq_level = dpo_margin((1 + lam) * pc - lam * rc, (1 + lam) * pr - lam * rr, rc, rr, beta)

    assert torch.allclose(seq_level, (1 + lam) * sr_conf, atol=1e-5)  # only a rescaling
    assert torch.equal(seq_level.argsort(), sr_conf.argsort())
    assert dnd_conf.argmin() != sr_conf.argmin()

    # and through the window: K = 1/8 of 8 pairs flags exactly the least-confident one
    flagged = {}
    for name, conf in (("sr", sr_conf), ("dnd", dnd_conf)):
        w = RefinementWindow(size=50, k_percent=100.0 / n, warmup_fraction=0.0)
        w.update(conf)
        flagged[name] = w.flags(conf, step=0, total_steps=1)
    assert flagged["sr"].sum() == 1 and flagged["dnd"].sum() == 1
    assert not torch.equal(flagged["sr"], flagged["dnd"])


def test_refinement_breaks_even_when_half_the_flagged_labels_are_wrong():
    """Eq. 10 near the reference (m = 0): smoothing a flagged pair takes alpha from its push, whichever way its label
    points. Over flagged pairs of which a share p is mislabelled, the push towards the true labels changes by
    alpha * (2p - 1) per pair (m in Eq. 5's units, beta included): a gain only when p > 0.5. This is the
    break-even the demo report checks SR's flag precision against."""
    alpha, n = 0.1, 10

    def push_towards_truth(z, truth_sign):  # truth_sign +1: the label is right, so raising m moves towards the truth
        m = torch.zeros(n, requires_grad=True)
        refined_dpo_loss(m, z, alpha).sum().backward()
        return float((-m.grad * truth_sign).sum())  # gradient descent moves m by -grad

    for p_wrong in (0.2, 0.5, 0.8):
        truth_sign = torch.tensor([-1.0 if i < p_wrong * n else 1.0 for i in range(n)])
        change = push_towards_truth(torch.ones(n), truth_sign) - push_towards_truth(torch.zeros(n), truth_sign)
        assert change == pytest.approx(n * alpha * (2 * p_wrong - 1), abs=1e-6)
