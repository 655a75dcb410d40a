"""Training pairs as the trainer takes them: rendered, collated, and the reference's log-probs once.

Rendering goes through :mod:`spa.models.rendering` (one BOS, end-of-turn only after a finished
response); the collator puts the chosen sequences first, then the rejected ones, right-padded
together, so the loss splits every batch in halves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from spa.models.logprobs import Encoded, collate, encode_pair


class PairDataset(Dataset):
    """Rendered (chosen, rejected) pairs; rendering goes through :mod:`spa.models.rendering`."""

    def __init__(self, tok: PreTrainedTokenizerBase, prompts, chosen, rejected, max_length: int,
                 chosen_finished=None, rejected_finished=None, prompt_emb=None, key_phrases: bool = False,
                 where: list[str] | None = None):
        """``where``: each pair's name in errors (its source row); the pair's index when not given."""
        n = len(prompts)
        self.prompt_emb = torch.as_tensor(prompt_emb, dtype=torch.float32) if prompt_emb is not None else None
        self.spans = None
        if key_phrases:  # SPO: RAKE key phrases as response-token indices, once per run (docs/variants.md 1.3)
            from spa.training.rake import key_phrase_token_spans

            self.spans = [(key_phrase_token_spans(tok, p, c), key_phrase_token_spans(tok, p, r))
                          for p, c, r in zip(prompts, chosen, rejected, strict=True)]
        cf = chosen_finished if chosen_finished is not None else [True] * n
        rf = rejected_finished if rejected_finished is not None else [True] * n
        names = where if where is not None else list(range(n))
        self.items = [
            (encode_pair(tok, p, c, fc, max_length, row=w), encode_pair(tok, p, r, fr, max_length, row=w))
            for p, c, r, fc, fr, w in zip(prompts, chosen, rejected, cf, rf, names, strict=True)
        ]
        self.ref_logps: torch.Tensor | None = None  # [n, 2] precomputed reference log-probs (chosen, rejected)

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Padded width each pair needs (its longer sequence): the key of length-grouped sampling."""
        return [max(len(c.input_ids), len(r.input_ids)) for c, r in self.items]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"chosen": self.items[i][0], "rejected": self.items[i][1], "row": i}
        if self.prompt_emb is not None:
            item["prompt_emb"] = self.prompt_emb[i]
        if self.spans is not None:
            item["spo"] = self.spans[i]
        if self.ref_logps is not None:
            item["ref_logps"] = self.ref_logps[i]
        return item


class MixedDataset(Dataset):
    """The gold pairs and the unpaired responses of SSPO / DPO+SFT's seed stage, as one shuffled set: rows
    ``0 .. n_pairs - 1`` are the pairs, the rest the unpaired responses (each seen once per epoch)."""

    def __init__(self, pairs: PairDataset, tok: PreTrainedTokenizerBase, prompts, responses, max_length: int,
                 where: list[str] | None = None, finished: list[bool] | None = None):
        self.pairs = pairs
        names = where if where is not None else [f"unpaired row {i}" for i in range(len(prompts))]
        ended = finished if finished is not None else [True] * len(prompts)  # a cut-off answer gets no end-of-turn
        self.singles = [encode_pair(tok, p, r, f, max_length, row=w)
                        for p, r, f, w in zip(prompts, responses, ended, names, strict=True)]

    @property
    def items(self):  # the pairs: what the reference's log-probs are computed for (DPO+SFT)
        return self.pairs.items

    @property
    def ref_logps(self):
        return self.pairs.ref_logps

    @ref_logps.setter
    def ref_logps(self, value) -> None:
        self.pairs.ref_logps = value

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    @property
    def n_unpaired(self) -> int:
        return len(self.singles)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.singles)

    def lengths(self) -> list[int]:
        return self.pairs.lengths() + [len(e.input_ids) for e in self.singles]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < len(self.pairs):
            return self.pairs[i]
        return {"single": self.singles[i - len(self.pairs)], "unpaired_row": i - len(self.pairs)}


class PairCollator:
    """Chosen sequences first, then rejected ones, right-padded together (then, in SSPO / DPO+SFT's seed stage,
    the unpaired responses of the micro-batch, with ``pair_count`` saying where the pairs end)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Encoded]]) -> dict[str, torch.Tensor]:
        singles = [f for f in features if "single" in f]
        features = [f for f in features if "single" not in f]
        seqs = [f["chosen"] for f in features] + [f["rejected"] for f in features] + [f["single"] for f in singles]
        batch = collate(seqs, self.pad_id)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "target_ids": batch["labels"],  # not "labels": Trainer must not count tokens for its own loss
            "loss_mask": batch["loss_mask"],
            "row_ids": torch.tensor([f["row"] for f in features], dtype=torch.long),
        }
        if singles:
            out["pair_count"] = torch.tensor(len(features), dtype=torch.long)
            out["unpaired_rows"] = torch.tensor([f["unpaired_row"] for f in singles], dtype=torch.long)
        if not features:
            return out
        if "prompt_emb" in features[0]:
            out["prompt_emb"] = torch.stack([f["prompt_emb"] for f in features])
        if "ref_logps" in features[0]:  # in the order of the sequences: chosen ones, then rejected ones
            ref = torch.stack([f["ref_logps"] for f in features])
            out["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
        if "spo" in features[0]:
            seqs_info = [f["spo"][0] for f in features] + [f["spo"][1] for f in features]
            out["spo_prompt_lens"] = torch.tensor([e.response_start for e in seqs])
            out["spo_text_lens"] = torch.tensor([info[1] for info in seqs_info])
            out["spo_spans"] = [info[0] for info in seqs_info]
        return out


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: list[tuple[Encoded, Encoded]], pad_id: int, batch_size: int,
                    bf16: bool = False) -> torch.Tensor:
    """Summed log-probs of each pair's chosen and rejected response under ``model``: ``[n, 2]`` float64.

    The reference terms of Eq. 5/6 (``log pi_ref(y|x)``) computed once, before training, in eval mode and in
    length-sorted batches, with the precision the policy trains in (bf16 autocast or fp32). Hand-written
    because ``Trainer`` has no reference pass; TRL's ``precompute_ref_log_probs`` is the same idea.
    A peft model is scored with its adapter disabled (the base weights: the LoRA reference).
    """
    from contextlib import nullcontext

    from spa.models.logprobs import encoded_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    adapter_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    try:
        with autocast, adapter_off:
            # one length-sorted pass over all 2n sequences: chosen ones, then rejected ones
            logps, _ = encoded_logps(model, [c for c, _ in pairs] + [r for _, r in pairs], pad_id, batch_size,
                                     "reference log-probs")
    finally:
        model.train(was_training)
    return torch.from_numpy(logps).view(2, len(pairs)).T.contiguous()


def disable_dropout(model: torch.nn.Module) -> None:
    """Policy and reference must agree at step 0 (loss = ln 2); dropout would break that."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
