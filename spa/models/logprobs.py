"""Summed response log-probabilities of (prompt, response) pairs.

``log pi(y|x) = sum_t log pi(y_t | x, y_<t)`` over response tokens only (docs/algorithm.md,
Notation), rendered by :mod:`spa.models.rendering`. Pairs are scored in length-sorted
batches (little padding) and returned in input order, with token counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from spa.errors import SequenceTooLongError  # noqa: F401 - raised here, defined without torch for the CLI
from spa.models.rendering import render


@dataclass(frozen=True)
class Encoded:
    """One rendered pair: ids of prompt + response and where the response starts."""

    input_ids: list[int]
    response_start: int

    @property
    def num_response_tokens(self) -> int:
        return len(self.input_ids) - self.response_start


def encode_pair(
    tok: PreTrainedTokenizerBase, prompt: str, response: str, finished: bool = True, max_length: int | None = None,
    row: int | str | None = None,
) -> Encoded:
    """Render one pair through the shared path; longer than ``max_length`` is an error naming the row (an index,
    or a description of where the pair comes from)."""
    p_ids, r_ids = render(tok, prompt, response, finished)
    ids = p_ids + r_ids
    if max_length is not None and len(ids) > max_length:
        where = f"row {row}: " if isinstance(row, int) else f"{row}: " if row else ""
        raise SequenceTooLongError(
            f"{where}prompt ({len(p_ids)} tokens) + response ({len(r_ids)} tokens) exceed max_length={max_length}; "
            "raise model.max_length or drop the row"
        )
    return Encoded(ids, len(p_ids))


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; ``labels``/``loss_mask`` are shifted so that ``logits[:, t]`` scores ``labels[:, t]``."""
    width = max(len(e.input_ids) for e in encoded)
    n = len(encoded)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width - 1), dtype=torch.bool)
    for i, e in enumerate(encoded):
        length = len(e.input_ids)
        input_ids[i, :length] = torch.tensor(e.input_ids)
        attention[i, :length] = 1
        # label position t-1 predicts token t; response tokens are t >= response_start
        loss_mask[i, e.response_start - 1 : length - 1] = True
    labels = input_ids[:, 1:].clone()
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "loss_mask": loss_mask}


def gather_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of ``log_softmax(logits)[labels]`` over masked positions (``[B, T, V]`` -> ``[B]``).

    Uses ``gather - logsumexp`` so no second ``[B, T, V]`` log-softmax tensor is built.
    """
    logits = logits.float()
    token_logp = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logp * loss_mask).sum(-1)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: an OOM shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def sequence_logps(
    model: torch.nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    finished: Sequence[bool] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of each response given its prompt, and its token count.

    Returns ``(logps float64 [N], num_tokens int32 [N])`` in input order. A response
    with ``finished=False`` (cut at the token limit) is scored without end-of-turn token.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    finished = [True] * len(prompts) if finished is None else list(finished)
    encoded = [
        encode_pair(tok, p, r, f, max_length, row=i)
        for i, (p, r, f) in enumerate(zip(prompts, responses, finished, strict=True))
    ]
    return encoded_logps(model, encoded, tok.pad_token_id, batch_size, progress)


@torch.no_grad()
def encoded_logps(
    model: torch.nn.Module, encoded: Sequence[Encoded], pad_id: int, batch_size: int = 8, progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sequence_logps` on pairs already turned into ids (e.g. the exact ids a sampler drew)."""
    logps = np.zeros(len(encoded), dtype=np.float64)
    counts = np.array([e.num_response_tokens for e in encoded], dtype=np.int32)
    device = next(model.parameters()).device
    batches = length_sorted_batches([len(e.input_ids) for e in encoded], batch_size)
    for idx in tqdm(batches, desc=progress, disable=progress is None, unit="batch"):
        batch = collate([encoded[i] for i in idx], pad_id)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        values = gather_logps(out.logits[:, :-1], batch["labels"].to(device), batch["loss_mask"].to(device))
        logps[idx] = values.double().cpu().numpy()
    return logps, counts
