"""The SPA training math as pure tensor functions (Kim et al., ICLR 2025).

Equation numbers are the paper's; `docs/algorithm.md` records the decisions
taken where the paper is vague. These are written by hand because no library
implements SPA's refined loss, de-coupled noise detection or the confidence
window; plain DPO is kept here too so that both share one margin definition.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from spa.judges.implicit_reward import implicit_reward


def dpo_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO implicit-reward margin, Eq. 5 (the argument of sigma): the difference of two Eq. 4 rewards.

    ``m = beta*(log pi(y_w) - log pi_ref(y_w)) - beta*(log pi(y_l) - log pi_ref(y_l))``.
    All inputs are ``[B]`` summed response log-probs; returns ``[B]`` in their dtype.
    """
    return (implicit_reward(policy_chosen_logps, ref_chosen_logps, beta)
            - implicit_reward(policy_rejected_logps, ref_rejected_logps, beta))


def refined_dpo_loss(margin: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample self-refined DPO loss, Eq. 10.

    ``-[(1 - alpha*z) * log sigma(m) + alpha*z * log sigma(-m)]`` with ``z`` in {0, 1}
    (``[B]``, no gradient). ``z = 0`` is plain DPO (Eq. 6): ``-log sigma(m)``.
    Returns ``[B]``; the caller takes the mean over the batch.
    """
    z = z.detach().to(margin.dtype)
    smooth = alpha * z
    return -((1.0 - smooth) * F.logsigmoid(margin) + smooth * F.logsigmoid(-margin))


def _auto_chunk(batch: int, vocab: int, budget_elems: int = 1 << 22) -> int:
    # ~4M elements (16 MB in fp32) per chunk: small next to the [B, T, V] logits we already hold.
    return max(1, budget_elems // max(1, batch * vocab))


@torch.no_grad()
def extrapolated_logps(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    lam: float,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed log-probs of ``labels`` under the extrapolated model of Eq. 12.

    ``h_tilde = (1 + lam) * h_theta - lam * h_ref`` on the **full-vocabulary logits**
    (at the sequence level the extrapolation would only rescale the margin, making
    de-coupled noise detection a no-op; docs/algorithm.md). Shapes: logits ``[B, T, V]``,
    ``labels``/``loss_mask`` ``[B, T]`` already shifted (``logits[:, t]`` scores
    ``labels[:, t]``). Returns ``[B]`` float32, without gradient.

    The sequence is processed in chunks of ``chunk_size`` positions (automatic when
    None) so that only a ``[B, chunk, V]`` extrapolated tensor exists at a time,
    never a second full ``[B, T, V]`` one.
    """
    if policy_logits.shape != ref_logits.shape:
        raise ValueError(f"policy/ref logits differ in shape: {tuple(policy_logits.shape)} vs {tuple(ref_logits.shape)}")
    batch, seq, vocab = policy_logits.shape
    if labels.shape != (batch, seq) or loss_mask.shape != (batch, seq):
        raise ValueError(f"labels {tuple(labels.shape)} / loss_mask {tuple(loss_mask.shape)} must be {(batch, seq)}")
    step = chunk_size or _auto_chunk(batch, vocab)
    mask = loss_mask.to(torch.bool)
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels)).long()  # -100 labels under the mask
    total = torch.zeros(batch, dtype=torch.float32, device=policy_logits.device)
    for start in range(0, seq, step):
        stop = min(seq, start + step)
        # one new chunk tensor, updated in place (no second temporary for lam * h_ref)
        h = policy_logits[:, start:stop].float().mul(1.0 + lam)
        h.sub_(ref_logits[:, start:stop].float(), alpha=lam)
        token_logp = h.gather(-1, safe_labels[:, start:stop, None]).squeeze(-1) - torch.logsumexp(h, dim=-1)
        total += (token_logp * mask[:, start:stop]).sum(-1)
        del h
    return total


def percentile_threshold(values: torch.Tensor, k_percent: float) -> torch.Tensor:
    """``tau`` of Eq. 9: the K-th percentile of ``values`` (linear interpolation)."""
    return torch.quantile(values.double(), k_percent / 100.0)


def _gather_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """All ranks' values, concatenated in rank order (identity without data parallelism)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.full((longest,), float("nan"), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class RefinementWindow:
    """Sliding window of per-sample confidences that yields the ``z`` of Eq. 9.

    ``tau`` is the ``k_percent``-th percentile of the most recent ``size`` confidences
    (Appendix B.4, "simple moving average over the most recent 50"), current batch
    included; ``z = 1`` where a confidence is below ``tau``. No sample is flagged during
    the denoising warm-up (the first ``warmup_fraction`` of the optimiser steps), but
    the window keeps filling. Confidences can be ``p_conf`` or the margin (sigmoid is
    monotone, so both flag the same samples). Under data parallelism ``update`` gathers
    every rank's values so all ranks share one window and one ``tau`` (docs/algorithm.md, "Self-refinement").
    """

    def __init__(self, size: int, k_percent: float, warmup_fraction: float):
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        if not 0.0 <= k_percent <= 100.0:
            raise ValueError(f"k_percent must be in [0, 100], got {k_percent}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        self.size = size
        self.k_percent = k_percent
        self.warmup_fraction = warmup_fraction
        self._values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def update(self, values: torch.Tensor) -> None:
        """Push this batch's per-sample confidences (gathered across ranks)."""
        flat = _gather_across_ranks(values.detach().flatten().float())
        self._values.extend(flat.cpu().tolist())

    def state(self) -> list[float]:
        """The window's values, oldest first (for checkpoints)."""
        return list(self._values)

    def load(self, values: list[float]) -> None:
        """Restore a checkpointed window (no gathering: every rank loads the same global window)."""
        self._values.clear()
        self._values.extend(values)

    @property
    def tau(self) -> float | None:
        """Current threshold, or None while the window is empty."""
        if not self._values:
            return None
        return float(percentile_threshold(torch.tensor(list(self._values)), self.k_percent))

    def in_warmup(self, step: int, total_steps: int) -> bool:
        """True during the denoising warm-up: the first ``warmup_fraction`` of the steps (0-based ``step``)."""
        return step < self.warmup_fraction * total_steps

    def flags(self, values: torch.Tensor, step: int, total_steps: int) -> torch.Tensor:
        """``z`` of Eq. 9 for ``values`` (``[B]``): bool, all False during warm-up."""
        tau = self.tau
        if tau is None or self.in_warmup(step, total_steps):
            return torch.zeros_like(values, dtype=torch.bool)
        return values.detach().double() < tau


# --- variants (`docs/variants.md`) --------------------------------------------------------------


@torch.no_grad()
def rpo_weights(chosen_prompt_emb: torch.Tensor, rejected_prompt_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """RPO's prompt-similarity weights (Yin et al., Eq. 11-12): ``w = softmax_j(-(1 - cos(e_i, e_j)) / tau)``
    over the ``[M, d]`` winners' and ``[N, d]`` losers' prompt embeddings (each row sums to 1; cosine *distance*,
    as the official code). Returns ``[M, N]`` float32, no gradient."""
    ec = F.normalize(chosen_prompt_emb.float(), dim=-1)
    er = F.normalize(rejected_prompt_emb.float(), dim=-1)
    return torch.softmax(-(1.0 - ec @ er.T) / tau, dim=1)


def rpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_prompt_emb: torch.Tensor,
    rejected_prompt_emb: torch.Tensor,
    beta: float,
    tau: float,
    z_chosen: torch.Tensor | None = None,
    z_rejected: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Relative Preference Optimization (Yin et al., Eq. 9-14; docs/variants.md section 2): scalar loss.

    ``s_ij = beta * w_ij * ((pc_i - rc_i) - (pr_j - rr_j))`` over the M winners x N losers, ``w`` of
    :func:`rpo_weights`, loss ``mean_ij -logsigmoid(s_ij)``. Paired data: M = N, pairs on the diagonal.
    With self-refinement (docs/variants.md 2.7) ``z_ij = max(z_i, z_j)`` and SPA Eq. 10 per entry
    (``alpha`` is SR's; 0 without refinement). Written by hand: no library has RPO's contrast matrix.
    """
    lw = policy_chosen_logps - ref_chosen_logps  # [M]
    ll = policy_rejected_logps - ref_rejected_logps  # [N]
    diff = lw[:, None] - ll[None, :]  # [M, N]
    w = rpo_weights(chosen_prompt_emb, rejected_prompt_emb, tau).to(diff.dtype)
    s = beta * w * diff
    if z_chosen is None and z_rejected is None:
        return (-F.logsigmoid(s)).mean()
    zc = (z_chosen if z_chosen is not None else torch.zeros_like(lw)).to(s.dtype)
    zr = (z_rejected if z_rejected is not None else torch.zeros_like(ll)).to(s.dtype)
    z = torch.maximum(zc[:, None], zr[None, :])
    return refined_dpo_loss(s, z, alpha).mean()


def dro_moved_share(xi: torch.Tensor, eps: float, xi_min: float) -> torch.Tensor:
    """The worst case's transport plan of the Wasserstein-DRO reweighting (docs/variants.md 3.3, from
    proposal Eq. 2-3/2-4): the share ``p_i`` of each pair's probability mass moved from ``xi_i`` to
    ``xi_min``.

    The worst case of ``E_Q[-log xi]`` over the W1 ball of radius ``eps`` around the empirical
    distribution of ``xi_i = sigmoid(margin_i)`` on the support ``[xi_min, 1]`` moves mass to
    ``xi_min``, lowest ``xi`` first, until the budget ``N * eps`` is spent (a fractional knapsack:
    ``-log`` is convex and decreasing, so the cheapest gain per unit of transport is always the
    move to the boundary). Pairs with ``xi_i <= xi_min`` (outside the support) move nothing.
    Written by hand: the closed form is the thesis' LP solved analytically. Returned in float64 on the CPU.
    """
    x = xi.detach().double().cpu()
    budget = float(len(x)) * eps
    p = torch.zeros_like(x)
    for i in torch.argsort(x, stable=True).tolist():
        if budget <= 0:
            break
        cost = float(x[i]) - xi_min
        if cost <= 0:
            continue
        p[i] = min(1.0, budget / cost)
        budget -= float(p[i]) * cost
    return p


def dro_weights(xi: torch.Tensor, eps: float, xi_min: float) -> torch.Tensor:
    """Per-pair weights of the Wasserstein-DRO reweighting (docs/variants.md 3.3, from proposal Eq. 2-3/2-4).

    With ``p_i`` the moved share of :func:`dro_moved_share`, the loss ``w_i * -logsigmoid(margin_i)``,
    ``w_i = (1 - p_i) + p_i * xi_i / xi_min`` (detached), has the gradient of the worst case at the
    current parameters. Pairs with ``xi_i <= xi_min`` (outside the support) keep weight 1.
    """
    x = xi.detach().double().cpu()
    return _weights_of_share(x, dro_moved_share(x, eps, xi_min), xi_min).to(device=xi.device, dtype=xi.dtype)


def _weights_of_share(x: torch.Tensor, p: torch.Tensor, xi_min: float) -> torch.Tensor:
    w = (1 - p) + p * x / xi_min
    return torch.where(x <= xi_min, torch.ones_like(w), w)


def dro_diagnostics(xi: torch.Tensor, eps: float, xi_min: float) -> dict[str, float]:
    """What ``train_log`` records of one DRO solve (docs/variants.md 3.3, item 7): the largest weight of
    :func:`dro_weights`, the group's size and the share of its mass the worst case moves (:func:`dro_moved_share`)."""
    x = xi.detach().double().cpu()
    p = dro_moved_share(x, eps, xi_min)  # solved once for both numbers
    return {"dro_max_weight": float(_weights_of_share(x, p, xi_min).max()), "dro_group_size": float(len(x)),
            "dro_moved_fraction": float(p.mean())}


def dro_dpo_loss(margin: torch.Tensor, eps: float, xi_min: float,
                 z: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Per-sample loss of the DRO variants: ``w_i * -logsigmoid(margin_i)`` (``dro``), or with SR
    (``sr+dro``) SPA Eq. 10 on the flagged pairs (``z = 1``) and the DRO weights computed over the
    unflagged ones only."""
    base = -F.logsigmoid(margin)
    if z is None:
        return dro_weights(torch.sigmoid(margin), eps, xi_min) * base
    keep = z == 0
    loss = refined_dpo_loss(margin, z.to(margin.dtype), alpha)
    if bool(keep.any()):
        w = dro_weights(torch.sigmoid(margin[keep]), eps, xi_min)
        loss = loss.clone()
        loss[keep] = w * base[keep]
    return loss
