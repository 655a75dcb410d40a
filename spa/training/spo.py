"""SPO: Self-supervised Preference Optimization (Li et al.; docs/variants.md section 1).

Key phrases (RAKE) are removed from each training response by masking their tokens; a head on the
policy's last hidden states of the remaining response tokens predicts how many were removed (class
``c = removed - 1``, ``c`` uniform in ``0..N-1``, redrawn every step). One head for preferred, one for
dispreferred responses (SPO Eq. 4-7)::

    loss = L_align + gamma * (CE_pref + CE_dispref)

The hidden states come from the policy's ordinary forward pass (no extra pass). Decisions of
docs/variants.md 1.6: per-token MLP (Linear-ReLU-Linear-ReLU, width ``min(d, 1024)``) on hidden state plus
sinusoidal position encoding (positions re-indexed over the kept tokens), mean over kept tokens,
then a linear layer to ``N`` classes; fp32; a response with fewer than ``c + 1`` key phrases is left
out of that head's loss for the step. Written by hand: no library has SPO.
"""

from __future__ import annotations

import torch
from torch import nn

from spa.config import SPOConfig


def sinusoidal(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """SPO Eq. 5: ``P[pos, 2i] = sin(pos / 10000^(2i/d))``, ``P[pos, 2i+1] = cos(...)``."""
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    angle = positions.float()[:, None] / torch.pow(10000.0, i / dim)[None, :]
    pe = torch.zeros(len(positions), dim, device=positions.device)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


class RemovalHead(nn.Module):
    """Predicts the number of removed key phrases from the kept tokens' hidden states."""

    def __init__(self, hidden: int, n_classes: int, width: int):
        super().__init__()
        w = min(hidden, width)
        self.mlp = nn.Sequential(nn.Linear(hidden, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU())
        self.out = nn.Linear(w, n_classes)
        self.hidden = hidden

    def forward(self, states: list[torch.Tensor]) -> torch.Tensor:
        """``states``: one ``[T_i, d]`` tensor of kept-token hidden states per response -> logits ``[B, N]``."""
        pooled = []
        for h in states:
            h = h.float() + sinusoidal(torch.arange(len(h), device=h.device), self.hidden)
            pooled.append(self.mlp(h).mean(0))
        return self.out(torch.stack(pooled))


class SPOHeads(nn.Module):
    def __init__(self, hidden: int, settings: SPOConfig):
        super().__init__()
        self.pref = RemovalHead(hidden, settings.n_classes, settings.width)
        self.dispref = RemovalHead(hidden, settings.n_classes, settings.width)


def draw_removals(spans: list[list[list[int]]], n_classes: int, gen: torch.Generator, draw: str = "uniform"
                  ) -> tuple[list[int], list[set[int]], list[bool]]:
    """Per response: the class ``c`` (``c + 1`` phrases removed), the token indices to mask, and whether
    the response has enough key phrases to take part. ``draw="available"`` draws ``c`` only among the
    classes the response can support (docs/variants.md 1.6, item 5's option)."""
    classes, masked, usable = [], [], []
    for phrases in spans:
        top = n_classes if draw == "uniform" else max(1, min(n_classes, len(phrases)))
        c = int(torch.randint(0, top, (1,), generator=gen))
        ok = len(phrases) >= c + 1
        chosen = torch.randperm(len(phrases), generator=gen)[: c + 1].tolist() if ok else []
        classes.append(c)
        masked.append({t for k in chosen for t in phrases[k]})
        usable.append(ok)
    return classes, masked, usable


def aux_loss(head: RemovalHead, hidden: torch.Tensor, starts: list[int], text_lens: list[int],
             spans: list[list[list[int]]], n_classes: int, gen: torch.Generator,
             draw: str = "uniform") -> tuple[torch.Tensor, int, int]:
    """Cross-entropy (SPO Eq. 6) of one head over a group of responses, with correct and counted predictions.

    ``hidden[i, starts[i] + j]`` is the last hidden state of response token ``j`` of sequence ``i``.
    """
    classes, masked, usable = draw_removals(spans, n_classes, gen, draw)
    states, targets = [], []
    for i, ok in enumerate(usable):
        keep = [j for j in range(text_lens[i]) if j not in masked[i]]
        if not ok or not keep:
            continue
        states.append(hidden[i, [starts[i] + j for j in keep]])
        targets.append(classes[i])
    if not states:
        return hidden.new_zeros(()), 0, 0
    logits = head(states)
    y = torch.tensor(targets, device=logits.device)
    loss = nn.functional.cross_entropy(logits, y)
    return loss, int((logits.argmax(-1) == y).sum()), len(targets)


def step_generator(seed: int, step: int, first_row: int) -> torch.Generator:
    """Removal draws that a resumed run repeats exactly: seeded by (seed, step, first row of the micro-batch)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) * 1_000_033 + int(first_row))
