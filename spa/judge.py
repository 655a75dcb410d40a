"""Direct preference judgment with the implicit reward (Eq. 4, 7, 8, 13)."""

from __future__ import annotations

import torch


def implicit_reward(
    policy_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    beta: float,
    length_penalty: float = 0.0,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPO implicit reward ``r(y) = beta * (log pi(y|x) - log pi_ref(y|x))`` (Eq. 4).

    ``ref_logp=None`` is the paper's reference-free variant (Table 7),
    ``r = beta * log pi(y|x)``. With ``length_penalty = a > 0`` the reward is
    ``r - a * |y|`` (Eq. 13, ``|y|`` in tokens), which needs ``length``.
    """
    policy_logp = torch.as_tensor(policy_logp, dtype=torch.float64)
    reward = beta * (policy_logp - torch.as_tensor(ref_logp, dtype=torch.float64)) if ref_logp is not None else beta * policy_logp
    if length_penalty:
        if length is None:
            raise ValueError("a length penalty (Eq. 13) needs the response lengths in tokens")
        reward = reward - length_penalty * torch.as_tensor(length, dtype=torch.float64)
    return reward


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
    """``p(y1 > y2 | x) = sigma(r(y1) - r(y2))`` of Eq. 7 (float64, ``[N]``).

    ``r`` is :func:`implicit_reward`: against a reference (``pi_init`` in SPA) or
    reference-free when both ``ref_logp_*`` are None, with the optional length
    penalty of Eq. 13. Identical inputs give exactly 0.5, a tie (SPA.md).
    """
    if (ref_logp_1 is None) != (ref_logp_2 is None):
        raise ValueError("give reference log-probs for both responses or for neither")
    r1 = implicit_reward(policy_logp_1, ref_logp_1, beta, length_penalty, len_1)
    r2 = implicit_reward(policy_logp_2, ref_logp_2, beta, length_penalty, len_2)
    return torch.sigmoid(r1 - r2)


def assign_labels(p_first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8: ``first_wins = p > 0.5`` and ``tie = p == 0.5`` (ties stay out of training)."""
    p_first = torch.as_tensor(p_first, dtype=torch.float64)
    return p_first > 0.5, p_first == 0.5
