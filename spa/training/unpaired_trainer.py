"""SSPO and DPO+SFT on ``RefinedDPOTrainer``: the seed stage's losses over gold pairs and unpaired responses.

``train.loss: sspo`` (Lee et al., ICLR 2026; docs/variants.md 7) and its control ``dpo+sft`` train on micro-batches
that mix gold pairs with unpaired responses (``spa.training.pairs.MixedDataset``). The math is in
:mod:`spa.training.sspo`; this mixin applies it per micro-batch, moves SSPO's statistics and threshold once per
optimiser step and records every pseudo-label. Hand-written because no library has SSPO (TRL has SimPO's reward only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa
import torch

from spa.config import LossKind
from spa.judges.implicit_reward import implicit_reward
from spa.models.logprobs import gather_logps
from spa.schemas import PSEUDO_LABELS
from spa.training.losses import dpo_margin, refined_dpo_loss
from spa.training.sspo import (
    FLAT_REWARDS,
    SSPOState,
    curriculum_weight,
    gold_pair_loss,
    normalise,
    pseudo_labels,
    simpo_reward,
    sspo_loss,
    unpaired_loss,
)


class PseudoLabel(NamedTuple):
    """One visit of an unpaired response in SSPO's seed stage (pseudo_labels.parquet)."""

    row: int  # index into <run>/data/unpaired.parquet
    step: int
    reward: float
    z: float
    delta: float
    label: bool


@dataclass
class UnpairedStep:
    """What SSPO / DPO+SFT collect over the micro-batches of one optimiser step: every reward (the running statistics
    are updated once a step over all of them), the gold pairs' raw rewards (the threshold's queue) and the terms."""

    rewards: list = field(default_factory=list)
    chosen: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    positives: float = 0.0
    unpaired: float = 0.0
    loss: float = 0.0
    gold_loss: float = 0.0
    unpaired_loss: float = 0.0
    micro_batches: float = 0.0
    gold_batches: float = 0.0  # micro-batches with at least one pair (the gold term's mean is over these)
    unpaired_batches: float = 0.0  # ... with at least one unpaired response


class UnpairedLossMixin:
    """The SSPO / DPO+SFT half of ``RefinedDPOTrainer`` (inactive for every other loss)."""

    def _init_unpaired(self) -> None:
        kind = self.loss_settings.kind
        self.unpaired_kind = kind in (LossKind.SSPO, LossKind.DPO_SFT)
        self.sspo_state = None
        self.g_min = 0.0
        if kind is LossKind.SSPO:
            cfg = self.loss_settings.sspo
            self.sspo_state = SSPOState(momentum=cfg.momentum, prior=cfg.prior, grid_points=cfg.grid_points,
                                        queue_steps=cfg.queue_steps, min_pairs=cfg.min_pairs, threshold=cfg.threshold)
            data = self.train_dataset  # g_min = n_L / (n_L + n_U): the gold pairs' share of the data
            self.g_min = data.n_pairs / len(data)
        self.unpaired_step = UnpairedStep()
        self.pseudo_labels: list[PseudoLabel] = []
        self.unpaired_prompt_ids: list[str] = []  # set by the worker (pseudo_labels.parquet names rows by them)

    def _unpaired_round_loss(self, model, inputs) -> torch.Tensor:
        """SSPO (``L = g R_L + (1 - g) R_U``, docs/variants.md 7) or DPO+SFT (DPO on the pairs plus
        ``weight * NLL`` of the unpaired responses) on a micro-batch of pairs and unpaired responses."""
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
        logps = gather_logps(out.logits[:, :-1], inputs["target_ids"], inputs["loss_mask"])
        n = int(inputs["pair_count"]) if "pair_count" in inputs else ids.shape[0] // 2
        terms = self._sspo_terms if self.sspo_state is not None else self._dpo_sft_terms
        loss, gold, unpaired, margin, rewards_chosen = terms(model, inputs, logps, n)
        pc, pr, single = logps[:n], logps[n:2 * n], logps[2 * n:]
        with torch.no_grad():
            acc = self.unpaired_step
            acc.unpaired += single.numel()
            acc.loss += loss.item()
            acc.gold_loss += float(gold)
            acc.unpaired_loss += float(unpaired)
            acc.micro_batches += 1
            acc.gold_batches += n > 0
            acc.unpaired_batches += single.numel() > 0
            self.stats.sums.add(
                loss=loss.item() * n, pairs=n, margin=margin.sum().item(), refined=0.0,
                logps_chosen=pc.sum().item(), logps_rejected=pr.sum().item(),
                rewards_chosen=rewards_chosen.sum().item(), rewards_correct=(margin > 0).sum().item())
            self.stats.lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
        return loss

    def _sspo_terms(self, model, inputs, logps: torch.Tensor, n: int):
        """SSPO's loss on the micro-batch, its two terms, the reward margin and chosen reward (SimPO's, or with
        ``reward: implicit`` DPO's Eq. 4); the rewards and pseudo-labels are recorded for the step's statistics and
        ``pseudo_labels.parquet``."""
        cfg, state, step = self.loss_settings.sspo, self.sspo_state, self.state.global_step
        if cfg.reward == "implicit":  # Eq. 4 against pi_init, on every row of the micro-batch (pairs and unpaired)
            ref_logits = self._reference_logits(model, inputs["input_ids"], inputs["attention_mask"])
            with torch.no_grad():
                ref = gather_logps(ref_logits[:, :-1], inputs["target_ids"], inputs["loss_mask"])
            r = implicit_reward(logps, ref.to(logps.dtype), self.beta)
        else:
            r = simpo_reward(logps, inputs["loss_mask"].sum(-1), cfg.beta)
        rc, rr, ru = r[:n], r[n:2 * n], r[2 * n:]
        zero = logps.new_zeros(())
        gold = gold_pair_loss(rc, rr, cfg.margin) if n else zero
        # normalised with the statistics of the steps before this one (the first step: its own micro-batch)
        spread = r.detach().std(unbiased=False).item() if r.numel() > 1 else 0.0
        mu = state.mu if state.mu is not None else r.detach().mean().item()
        sigma = state.sigma if state.sigma is not None else (spread if spread >= FLAT_REWARDS else 1.0)
        # (every reward equal, as the implicit reward's first step gives with policy = reference: sigma 1, so that the
        # float noise between two forward passes is not blown up to the clip: z is ~0, and its labels carry no
        # gradient, as g = 1 at step 0)
        z_u = normalise(ru, mu, sigma)
        unpaired = unpaired_loss(z_u, state.delta, cfg.beta, cfg.prior) if ru.numel() else zero
        loss = sspo_loss(gold, unpaired, curriculum_weight(step, cfg.decay, self.g_min))
        with torch.no_grad():
            acc = self.unpaired_step
            labels = pseudo_labels(z_u.detach(), state.delta)
            acc.rewards += r.detach().double().tolist()
            acc.chosen += rc.detach().double().tolist()
            acc.rejected += rr.detach().double().tolist()
            acc.positives += labels.sum().item()
            rows = inputs["unpaired_rows"].tolist() if "unpaired_rows" in inputs else []
            for i, row in enumerate(rows):
                self.pseudo_labels.append(PseudoLabel(row, step, ru[i].item(), z_u[i].item(), state.delta,
                                                      bool(labels[i])))
        return loss, gold, unpaired, (rc - rr).detach(), rc.detach()

    def _dpo_sft_terms(self, model, inputs, logps: torch.Tensor, n: int):
        """DPO+SFT's loss on the micro-batch (Eq. 6 on the pairs, the per-token NLL of the unpaired responses), its
        two terms, the DPO margin (Eq. 5) and the chosen responses' implicit reward (Eq. 4)."""
        targets, mask = inputs["target_ids"], inputs["loss_mask"]
        pc, pr, single = logps[:n], logps[n:2 * n], logps[2 * n:]
        zero = logps.new_zeros(())
        if "ref_logps" in inputs or n == 0:  # computed once before training; none needed without pairs
            ref = inputs["ref_logps"].to(logps.dtype) if n else logps[:0]
        else:
            ref_logits = self._reference_logits(model, inputs["input_ids"][:2 * n], inputs["attention_mask"][:2 * n])
            with torch.no_grad():
                ref = gather_logps(ref_logits[:, :-1], targets[:2 * n], mask[:2 * n])
        rc, rr = ref[:n], ref[n:]
        margin = dpo_margin(pc, pr, rc, rr, self.beta)
        gold = refined_dpo_loss(margin, torch.zeros_like(margin), 0.0).mean() if n else zero
        unpaired = -(single / mask[2 * n:].sum(-1).clamp(min=1)).mean() if single.numel() else zero
        loss = gold + self.loss_settings.dpo_sft.weight * unpaired
        return loss, gold, unpaired, margin.detach(), implicit_reward(pc, rc, self.beta).detach()

    def _finish_unpaired_step(self, row: dict[str, Any]) -> None:
        """The step's SSPO / DPO+SFT columns of the train log; SSPO's statistics and threshold move once here, over
        the rewards of every micro-batch on every rank (docs/variants.md 7, decision 5)."""
        acc, self.unpaired_step = self.unpaired_step, UnpairedStep()
        sums = torch.tensor([acc.positives, acc.unpaired, acc.loss, acc.gold_loss, acc.unpaired_loss,
                             acc.micro_batches, acc.gold_batches, acc.unpaired_batches], dtype=torch.float64,
                            device=self.accelerator.device)
        lists = (acc.rewards, acc.chosen, acc.rejected)
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            sums = self.accelerator.reduce(sums, reduction="sum")
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, lists)
            lists = tuple([v for part in parts for v in part[k]] for k in range(3))
        positives, unpaired, loss, gold, unpaired_loss, micro, gold_batches, unpaired_batches = sums.cpu().tolist()
        row.update(loss=loss / max(micro, 1.0), gold_loss=gold / gold_batches if gold_batches else None,
                   unpaired_loss=unpaired_loss / unpaired_batches if unpaired_batches else None,
                   unpaired_rows=unpaired)
        if self.sspo_state is not None:
            cfg = self.loss_settings.sspo
            row["sspo_g"] = curriculum_weight(row["step"] - 1, cfg.decay, self.g_min)
            row["sspo_positive_share"] = positives / unpaired if unpaired else None
            values = self.sspo_state.update(*(torch.tensor(v, dtype=torch.float64) for v in lists))
            row.update(sspo_mu=values["mu"], sspo_sigma=values["sigma"], sspo_delta=values["delta"],
                       sspo_threshold_updated=values["threshold_updated"])


def pseudo_labels_table(records: list[PseudoLabel], prompt_ids: list[str]) -> pa.Table:
    """``pseudo_labels.parquet``: every visit of an unpaired response, its reward, threshold and pseudo-label."""
    columns = {name: [getattr(r, name) for r in records] for name in PseudoLabel._fields}
    return pa.table({"prompt_id": [prompt_ids[r.row] for r in records], **columns}, schema=PSEUDO_LABELS.schema)
