"""Direct preference judgment with the implicit reward (Eq. 4, 7, 8, 13): the one home of these equations.

The judge stage (``spa.stages.judge``), the evaluation's gold agreement and the training margin
(``spa.training.losses.dpo_margin``) all compute them through these functions.
"""

from __future__ import annotations

import torch


def _tensor(x) -> torch.Tensor:
    """A tensor as given (its dtype kept: training's autograd graph), anything else as float64."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def length_penalised(reward: torch.Tensor, length: torch.Tensor | None, length_penalty: float) -> torch.Tensor:
    """Eq. 13: ``r(y) - a * |y|`` (``|y|`` in tokens); ``a = 0`` returns ``reward`` unchanged."""
    if not length_penalty:
        return reward
    if length is None:
        raise ValueError("a length penalty (Eq. 13) needs the response lengths in tokens")
    return reward - length_penalty * _tensor(length).to(reward.dtype)


def implicit_reward(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    beta: float,
    length_penalty: float = 0.0,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO implicit reward ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (Eq. 4), elementwise.

    ``ref_logp=None`` is the paper's reference-free variant (Table 7),
    ``r = beta * log pi(y|x)``. With ``length_penalty = a > 0`` the reward is
    ``r - a * |y|`` (Eq. 13, ``|y|`` in tokens), which needs ``length``. Tensors keep
    their dtype (the training margin's graph); other inputs are taken as float64.
    """
    policy_logp = _tensor(policy_logp)
    reward = beta * (policy_logp - _tensor(ref_logp).to(policy_logp.dtype)) if ref_logp is not None else beta * policy_logp
    return length_penalised(reward, length, length_penalty)


def preference(reward_1: torch.Tensor, reward_2: torch.Tensor) -> torch.Tensor:
    """Eq. 7 (Bradley-Terry on two rewards): ``p(y1 > y2 | x) = sigma(r(y1) - r(y2))``, elementwise.

    Equal rewards give exactly 0.5, a tie (docs/algorithm.md)."""
    return torch.sigmoid(_tensor(reward_1) - _tensor(reward_2))


def implicit_preference(
    policy_logp_1: torch.Tensor,
    ref_logp_1: torch.Tensor | None,
    policy_logp_2: torch.Tensor,
    ref_logp_2: torch.Tensor | None,
    beta: float,
    length_penalty: float = 0.0,
    len_1: torch.Tensor | None = None,
    len_2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``p(y1 > y2 | x) = sigma(r(y1) - r(y2))`` of Eq. 7 with the implicit reward of Eq. 4 (``[N]``, float64).

    ``r`` is :func:`implicit_reward`: against a reference (``pi_init`` in SPA) or
    reference-free when both ``ref_logp_*`` are None, with the optional length
    penalty of Eq. 13. Identical inputs give exactly 0.5, a tie (docs/algorithm.md).
    """
    if (ref_logp_1 is None) != (ref_logp_2 is None):
        raise ValueError("give reference log-probs for both responses or for neither")
    f64 = lambda x: None if x is None else _tensor(x).double()  # noqa: E731 - labels are judged in float64
    r1 = implicit_reward(f64(policy_logp_1), f64(ref_logp_1), beta, length_penalty, len_1)
    r2 = implicit_reward(f64(policy_logp_2), f64(ref_logp_2), beta, length_penalty, len_2)
    return preference(r1, r2)


def assign_labels(p_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: ``first_wins = p > 0.5`` and ``tie = p == 0.5`` (ties stay out of training)."""
    p_first = torch.as_tensor(p_first, dtype=torch.float64)
    return p_first > 0.5, p_first == 0.5


def select_pairs(rewards: torch.Tensor, lengths: torch.Tensor,
                 length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-vs-worst selection (DICE, Chen et al. 2024; docs/variants.md section 5).

    ``rewards`` and ``lengths`` are ``[num_prompts, n]``; the score is ``reward - length_penalty * length``;
    returns (chosen index, rejected index) per prompt: the first argmax and the first argmin. When all
    scores of a prompt are equal both indices are 0 (a tie).
    """
    score = length_penalised(rewards.double(), lengths.double(), length_penalty)  # Eq. 13
    chosen = torch.argmax(score, dim=1)
    rejected = torch.argmin(score, dim=1)
    same = score.max(dim=1).values == score.min(dim=1).values
    return torch.where(same, 0, chosen), torch.where(same, 0, rejected)


def _mean_length_gap(rewards: torch.Tensor, lengths: torch.Tensor, a: float) -> float:
    c, r = select_pairs(rewards, lengths, a)
    rows = torch.arange(len(c))
    return float((lengths[rows, c].double() - lengths[rows, r].double()).mean())


def _solve_nonnegative(gap, tol: float) -> float:
    """The ``a >= 0`` whose gap ``gap(a)`` (non-increasing, piecewise constant) is closest to 0.

    A bisection finds the jump across 0 to ``tol``; of its two sides the one with the smaller
    absolute gap wins (the smaller ``a`` on a tie)."""
    if gap(0.0) <= 0:
        return 0.0
    hi = 1e-3
    while gap(hi) > 0:
        hi *= 2
        if hi > 1e9:  # the gap never reaches 0 (e.g. equal lengths within every prompt): no penalty helps
            return 0.0
    lo = 0.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if gap(mid) > 0:
            lo = mid
        else:
            hi = mid
    return lo if abs(gap(lo)) <= abs(gap(hi)) else hi


def auto_length_penalty(rewards: torch.Tensor, lengths: torch.Tensor, tol: float = 1e-6,
                        signed: bool = False) -> float:
    """The ``a`` that makes the mean length gap (chosen - rejected) of :func:`select_pairs` closest to 0.

    ``signed=False`` is Eq. 13 as the paper writes it, ``a >= 0``: it can only penalise long answers,
    so a judge that already favours short ones gets ``a = 0``. ``signed=True`` also allows ``a < 0``
    (a bonus per token), which corrects a judge that favours short answers: the gap is closest to 0
    whichever way it leans. DICE scans a grid from 0 in steps of 1e-3; the gap is non-increasing in
    ``a`` (the argmax of ``r - a*len`` moves to shorter responses, the argmin to longer ones) and
    piecewise constant, so a bisection is at least as close to 0 as the best value of that grid.
    For ``a < 0`` the same search runs on the mirrored gap ``-gap(-b)``, again non-increasing in ``b``.
    """
    def gap(a: float) -> float:
        return _mean_length_gap(rewards, lengths, a)

    if signed and gap(0.0) < 0:
        return -_solve_nonnegative(lambda b: -gap(-b), tol)
    return _solve_nonnegative(gap, tol)
