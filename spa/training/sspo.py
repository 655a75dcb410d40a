"""SSPO's math (Semi-Supervised Preference Optimization, Lee et al., ICLR 2026, arXiv 2511.00040), as pure functions.

SSPO trains once on a few gold pairs ``D_L`` and many *unpaired* responses ``D_U`` (a prompt with one response):
a reward threshold learnt from the gold pairs pseudo-labels each unpaired response as winning or losing, and a
curriculum moves the loss's weight from the gold pairs to the pseudo-labelled responses. Written by hand because
no library implements it (TRL has SimPO's reward, not SSPO's threshold, pseudo-labels or curriculum).

Where the paper leaves a choice open, the choices here (docs/variants.md, "SSPO"):

- the running mean and deviation start from the first step's batch, then move by ``m`` per optimiser step;
  the threshold starts at 0 (the running mean, in normalised units) and moves by ``m`` too;
- the threshold is the Bayes-risk point between two Gaussian kernel density estimates (Silverman's bandwidth per
  class, floored at 1e-3; the CDFs are sums of normal CDFs, minimised over a grid of ``G`` points spanning the
  data +- 3 bandwidths); the authors' code instead takes the lowest normalised chosen reward of the batch
  (``min_chosen_threshold``);
- the gold rewards the density estimates see are a queue of the last steps' raw rewards, normalised with the
  current statistics, so that a batch with one or two gold pairs still gives a stable threshold; no update
  while fewer than ``min_pairs`` pairs are queued.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Z_CLIP = 5.0  # normalised rewards are clipped to +-5 deviations
BANDWIDTH_FLOOR = 1e-3


def simpo_reward(sum_logps: torch.Tensor, n_tokens: torch.Tensor, beta: float) -> torch.Tensor:
    """SimPO's reference-free reward, which SSPO uses: ``r(x, y) = beta / |y| * log pi_theta(y|x)``."""
    return beta * sum_logps / n_tokens.clamp(min=1)


def gold_pair_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float) -> torch.Tensor:
    """SSPO's loss on the gold pairs: ``R_L = mean -log sigmoid(r(x, y_w) - r(x, y_l) - Delta)`` (SimPO's form,
    ``Delta`` the target margin)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# a step's rewards whose spread is below this carry no scale (SSPOState.update skips them)
FLAT_REWARDS = 1e-6


def ema(previous: float | None, value: float, momentum: float) -> float:
    """``m * previous + (1 - m) * value``; the first value is taken as it is (``previous`` is ``None``)."""
    return value if previous is None else momentum * previous + (1.0 - momentum) * value


def normalise(rewards: torch.Tensor, mu: float, sigma: float, clip: float = Z_CLIP) -> torch.Tensor:
    """``z = clip((r - mu_t) / sigma_t, -5, 5)``, with the statistics held fixed (no gradient through them)."""
    return ((rewards - mu) / max(sigma, 1e-8)).clamp(-clip, clip)


def silverman_bandwidth(x: torch.Tensor, floor: float = BANDWIDTH_FLOOR) -> float:
    """Silverman's rule of thumb, ``0.9 * min(sd, IQR / 1.34) * n^(-1/5)`` (the deviation alone when the IQR is 0),
    never below ``floor``."""
    x = x.detach().double().flatten()
    n = x.numel()
    if n < 2:
        return floor
    sd = x.std(unbiased=True).item()
    iqr = (torch.quantile(x, 0.75) - torch.quantile(x, 0.25)).item()
    spread = min(sd, iqr / 1.34) if iqr > 0 else sd
    return max(0.9 * spread * n ** (-0.2), floor)


def kde_cdf(points: torch.Tensor, samples: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """The CDF of a Gaussian kernel density estimate on ``samples`` at ``points``: the mean of
    ``Phi((d - x_i) / h)`` (exact, no numeric integration)."""
    u = (points.double()[:, None] - samples.double().flatten()[None, :]) / bandwidth
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0))).mean(dim=1)


def bayes_threshold(z_chosen: torch.Tensor, z_rejected: torch.Tensor, prior: float = 0.5,
                    grid_points: int = 200) -> float:
    """SSPO's threshold: ``argmin_d P(s=1) * CDF_w(d) + P(s=0) * (1 - CDF_l(d))``, the point where calling everything
    above ``d`` winning misclassifies the least probability mass, with ``CDF_w`` and ``CDF_l`` the kernel density
    estimates of the normalised chosen and rejected gold rewards, over ``grid_points`` points."""
    h_w, h_l = silverman_bandwidth(z_chosen), silverman_bandwidth(z_rejected)
    both = torch.cat([z_chosen.flatten(), z_rejected.flatten()]).double()
    pad = 3.0 * max(h_w, h_l)
    grid = torch.linspace(both.min().item() - pad, both.max().item() + pad, grid_points, dtype=torch.float64)
    risk = prior * kde_cdf(grid, z_chosen, h_w) + (1.0 - prior) * (1.0 - kde_cdf(grid, z_rejected, h_l))
    return grid[int(torch.argmin(risk))].item()


def min_chosen_threshold(z_chosen: torch.Tensor) -> float:
    """The authors' code's threshold: the lowest normalised chosen reward of the batch."""
    return z_chosen.min().item()


def pseudo_labels(z_unpaired: torch.Tensor, delta: float) -> torch.Tensor:
    """``s = 1[z_u > delta_t]``: an unpaired response above the threshold is taken as winning (1.0), else losing."""
    return (z_unpaired > delta).to(z_unpaired.dtype)


def unpaired_loss(z_unpaired: torch.Tensor, delta: float, beta: float, prior: float = 0.5) -> torch.Tensor:
    """SSPO's loss on the pseudo-labelled responses:
    ``R_U = mean P(s) * [-s * log sigmoid(beta (z_u - delta)) - (1 - s) * log sigmoid(beta (delta - z_u))]``,
    with ``P(s=1) = prior``: a winning response is pushed above the threshold, a losing one below it."""
    s = pseudo_labels(z_unpaired.detach(), delta)
    weight = s * prior + (1.0 - s) * (1.0 - prior)
    per_row = -s * F.logsigmoid(beta * (z_unpaired - delta)) - (1.0 - s) * F.logsigmoid(beta * (delta - z_unpaired))
    return (weight * per_row).mean()


def curriculum_weight(step: int, decay: float, g_min: float, g_0: float = 1.0) -> float:
    """The gold loss's share at optimiser step ``step``: ``g = max(g_min, g_0 * exp(-lambda * step))``, with
    ``g_min = n_L / (n_L + n_U)`` in SSPO (the gold pairs' share of the data)."""
    return max(g_min, g_0 * math.exp(-decay * step))


def sspo_loss(gold: torch.Tensor, unpaired: torch.Tensor, g: float) -> torch.Tensor:
    """``L = g * R_L + (1 - g) * R_U``."""
    return g * gold + (1.0 - g) * unpaired


@dataclass
class SSPOState:
    """What SSPO carries from one optimiser step to the next: the running reward statistics, the threshold and the
    queue of recent gold rewards (raw, normalised when the threshold is fitted). Saved in checkpoints
    (:meth:`state_dict`), so a resumed run continues with the same threshold."""

    momentum: float = 0.95
    prior: float = 0.5
    grid_points: int = 200
    queue_steps: int = 20  # about 1 / (1 - momentum) steps of gold rewards
    min_pairs: int = 8
    threshold: str = "kde"  # or "min_chosen" (the authors' code)
    mu: float | None = None
    sigma: float | None = None
    delta: float = 0.0
    queue: deque = field(default_factory=deque)

    def update(self, rewards: torch.Tensor, gold_chosen: torch.Tensor, gold_rejected: torch.Tensor) -> dict[str, float]:
        """One optimiser step: the statistics from all of the step's ``rewards`` (gold and unpaired), then the
        threshold from the queued gold rewards. Returns the step's values for the train log."""
        r = rewards.detach().double().flatten()
        if r.numel() > 1 and r.std(unbiased=False).item() < FLAT_REWARDS:
            # every reward the same (DPO's implicit reward at the first step, the policy still the reference): no
            # scale to learn and no gold margin to queue, so nothing moves (a sigma of 0 would blow z up for steps)
            return {"mu": self.mu, "sigma": self.sigma, "delta": self.delta, "threshold_updated": 0.0}
        self.mu = ema(self.mu, r.mean().item(), self.momentum)
        self.sigma = ema(self.sigma, r.std(unbiased=False).item() if r.numel() > 1 else 1.0, self.momentum)
        self.queue.append((gold_chosen.detach().double().flatten().tolist(),
                           gold_rejected.detach().double().flatten().tolist()))
        while len(self.queue) > self.queue_steps:
            self.queue.popleft()
        chosen = torch.tensor([v for c, _ in self.queue for v in c], dtype=torch.float64)
        rejected = torch.tensor([v for _, rj in self.queue for v in rj], dtype=torch.float64)
        updated = False
        if self.threshold == "min_chosen" and len(gold_chosen):
            batch_z = normalise(gold_chosen.detach().double(), self.mu, self.sigma)
            self.delta = ema(self.delta, min_chosen_threshold(batch_z), self.momentum)
            updated = True
        elif self.threshold == "kde" and min(len(chosen), len(rejected)) >= self.min_pairs:
            z_w, z_l = normalise(chosen, self.mu, self.sigma), normalise(rejected, self.mu, self.sigma)
            self.delta = ema(self.delta, bayes_threshold(z_w, z_l, self.prior, self.grid_points), self.momentum)
            updated = True
        return {"mu": self.mu, "sigma": self.sigma, "delta": self.delta, "threshold_updated": float(updated)}

    def state_dict(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma, "delta": self.delta, "queue": [list(q) for q in self.queue]}

    def load_state_dict(self, state: dict) -> None:
        self.mu, self.sigma, self.delta = state["mu"], state["sigma"], state["delta"]
        self.queue = deque(tuple(q) for q in state["queue"])


def pseudo_label_accuracy(labels: torch.Tensor, oracle_scores: torch.Tensor) -> float:
    """With an oracle: the share of pseudo-labels that agree with it, a response being good when the oracle
    scores it at least the median of the scored responses."""
    median = torch.quantile(oracle_scores.double(), 0.5)  # the middle two's mean for an even count
    good = (oracle_scores.double() >= median).to(labels.dtype)
    return (labels == good).double().mean().item()
