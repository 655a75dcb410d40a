"""Refined DPO training on transformers' ``Trainer`` (Eq. 6, 9-12).

The optimiser, cosine schedule with warm-up, gradient accumulation and
checkpointing, data parallelism (``accelerate launch``/``torchrun``), FSDP2 sharding (spa/training/fsdp.py),
bf16 and gradient checkpointing all come from ``Trainer``; only the SPA loss is ours
(:meth:`RefinedDPOTrainer.compute_loss`). With LoRA the reference is the same
weights with the adapter disabled (no second copy in memory).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from spa.config import LossKind
from spa.judges.implicit_reward import implicit_reward
from spa.models.logprobs import gather_logps
from spa.schemas import REFINEMENT, TRAIN_LOG_WRITTEN
from spa.training.checkpoints import STATE_FILE
from spa.training.fsdp import FSDPTrainerMixin
from spa.training.losses import (
    RefinementWindow,
    dpo_margin,
    dro_diagnostics,
    dro_dpo_loss,
    extrapolated_logps,
    refined_dpo_loss,
    rpo_loss,
    rpo_weights,
)
from spa.training.progress import TrainProgress
from spa.training.rounds import LossSettings, RefineSettings
from spa.training.spo import SPOHeads, aux_loss, step_generator
from spa.training.unpaired_trainer import PseudoLabel, UnpairedLossMixin

log = logging.getLogger(__name__)
SPO_HEADS = "spo_heads.safetensors"  # SPO's heads, beside (not inside) the policy weights (RunLayout.spo_heads)


class FlagRecord(NamedTuple):
    """One training sample's refinement record: both detectors' confidences and flags (refinement.parquet)."""

    row: int  # index into the round's training pairs
    step: int
    confidence_sr: float
    confidence_dnd: float  # NaN when DND is off
    z_sr: bool
    z_dnd: bool


@dataclass
class StepSums:
    """Sums over the micro-batches of one optimiser step (``pairs`` is the count the others are divided by)."""

    loss: float = 0.0
    pairs: float = 0.0
    margin: float = 0.0
    refined: float = 0.0
    logps_chosen: float = 0.0
    logps_rejected: float = 0.0
    rewards_chosen: float = 0.0
    rewards_correct: float = 0.0

    def add(self, **values: float) -> None:
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def reduced(self, accelerator) -> StepSums:
        """The sums over every rank (the same object without data parallelism)."""
        if accelerator.num_processes < 2:
            return self
        total = accelerator.reduce(torch.tensor(astuple(self), dtype=torch.float64, device=accelerator.device), "sum")
        return StepSums(*total.cpu().tolist())

    def means(self) -> dict[str, float]:
        n = max(1.0, self.pairs)
        return {f.name: getattr(self, f.name) / n for f in fields(self) if f.name != "pairs"}


class _StepStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = StepSums()
        self.variant: dict[str, float] = {}  # per-step statistics of a loss variant (max over micro-batches)
        self.tau: float | None = None
        self.lr: float = 0.0


class RefinedDPOTrainer(UnpairedLossMixin, FSDPTrainerMixin, Trainer):
    """``Trainer`` whose loss is the refined DPO loss of Eq. 10 (plain DPO when refinement is off)."""

    def __init__(self, *args, ref_model: torch.nn.Module | None, beta: float, refine: RefineSettings | None,
                 resume_state: dict | None = None, loss: LossSettings | None = None, group_by_length: bool = False,
                 **kwargs):
        self.loss_settings = loss or LossSettings()
        self.group_by_length = group_by_length
        self.spo_heads = None
        spo = self.loss_settings.spo
        if spo is not None:
            model = kwargs.get("model") if "model" in kwargs else args[0]
            self.spo_heads = SPOHeads(model.config.hidden_size, spo).to(next(model.parameters()).device)
        super().__init__(*args, **kwargs)
        self.spo_counts = [0, 0, 0, 0]  # correct / counted, preferred head then dispreferred head
        self.loss_is_scaled_for_ga = False  # our loss is a per-micro-batch mean: Trainer divides by GA
        self.ref_model = ref_model
        self.beta = beta
        self.refine = refine
        make = (lambda: RefinementWindow(refine.window, refine.k_percent, refine.warmup_fraction)) if refine else None
        self.window = make() if refine else None
        # with DND on, SR's own flags are tracked beside it (not used in the loss) so that reports can
        # compare the two detectors on the same pairs
        self.window_sr = make() if refine and refine.lam > 0 else None
        self.stats = _StepStats()
        self._init_unpaired()
        self.step_logs: dict[str, float] | None = None  # this step's numbers for Trainer's own log of it (log)
        self.rows: list[dict[str, Any]] = []
        self.samples: list[FlagRecord] = []
        if resume_state:
            self.rows = resume_state["rows"]
            if self.window is not None:
                self.window.load(resume_state["window"])
            if self.window_sr is not None:
                self.window_sr.load(resume_state.get("window_sr", []))
            is_main = int(os.environ.get("RANK", "0")) == 0
            self.samples = [FlagRecord(*s) for s in resume_state.get("samples", [])] if is_main else []
            if self.sspo_state is not None and "sspo" in resume_state:  # the same threshold and statistics
                self.sspo_state.load_state_dict(resume_state["sspo"])
                self.pseudo_labels = [PseudoLabel(*p) for p in resume_state.get("pseudo_labels", [])] if is_main else []
        self.add_callback(_SPACallback(self))
        # one live bar with loss and lr (a TTY only) instead of transformers' bar and its printed log dicts
        self.remove_callback(ProgressCallback)
        self.remove_callback(PrinterCallback)
        self.add_callback(TrainProgress())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log of a step (``logging_steps=1``) with the step's SPA numbers (loss and lr as in ``train_log``):
        one dict a step reaches the callbacks, the trackers of ``train.report_to`` among them."""
        pending, self.step_logs = self.step_logs, None
        super().log({**logs, **pending} if pending and "loss" in logs else logs, start_time)

    def _issue_warnings_after_load(self, load_result) -> None:
        """A checkpoint leaves out a tied weight (``lm_head.weight``, which is the input embedding itself);
        loading the embedding loads it, as one tensor. transformers 5's ``Trainer`` recognises such keys only
        by the old ``_keys_to_ignore_on_save`` marker and would warn that they are missing: a key that is the
        very tensor of a loaded key is not missing. Any other missing key is still reported."""
        tensors = self.model.state_dict(keep_vars=True)
        absent = set(load_result.missing_keys)
        loaded = {id(v) for k, v in tensors.items() if k not in absent}
        missing = [k for k in load_result.missing_keys if id(tensors.get(k)) not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's random order, or (``train.group_by_length``) transformers' ``LengthGroupedSampler`` over
        the optimiser batch: similar lengths share a micro-batch, less padding (bench P4: ~2.5x tokens/s on a
        long-tailed length distribution)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=dataset.lengths())

    def create_optimizer(self):
        """Trainer's optimizer, plus SPO's heads as their own parameter group (own learning rate)."""
        opt = super().create_optimizer()
        if self.spo_heads is not None and not getattr(self, "_spo_group_added", False):
            opt.add_param_group({"params": list(self.spo_heads.parameters()), "lr": self.loss_settings.spo.head_lr,
                                 "weight_decay": 0.0})
            self._spo_group_added = True
        return opt

    def _spo_loss(self, hidden: torch.Tensor, inputs) -> torch.Tensor:
        """gamma * (CE_pref + CE_dispref) of SPO Eq. 7 on this micro-batch."""
        spo = self.loss_settings.spo
        half = hidden.shape[0] // 2
        starts, lens, spans = inputs["spo_prompt_lens"].tolist(), inputs["spo_text_lens"].tolist(), inputs["spo_spans"]
        gen = step_generator(self.loss_settings.seed, self.state.global_step, int(inputs["row_ids"][0]))
        total = hidden.new_zeros(())
        for k, (head, rows) in enumerate(((self.spo_heads.pref, slice(0, half)), (self.spo_heads.dispref, slice(half, None)))):
            loss, correct, count = aux_loss(head, hidden[rows], starts[rows], lens[rows], spans[rows], spo.n_classes, gen,
                                          spo.draw)
            total = total + loss
            self.spo_counts[2 * k] += correct
            self.spo_counts[2 * k + 1] += count
        return spo.gamma * total

    def _reference_logits(self, model, input_ids, attention_mask) -> torch.Tensor:
        with torch.no_grad():
            if self.ref_model is not None:
                return self.ref_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            unwrapped = self.accelerator.unwrap_model(model)
            with unwrapped.disable_adapter():  # LoRA: the reference is the base weights
                return unwrapped(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.unpaired_kind:
            return self._unpaired_round_loss(model, inputs)
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        targets, mask = inputs["target_ids"], inputs["loss_mask"]
        spo = self.spo_heads is not None
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=spo, use_cache=False)
        logits = out.logits[:, :-1]
        policy_logps = gather_logps(logits, targets, mask)
        needs_ref_logits = self.refine is not None and self.refine.lam > 0  # DND (Eq. 12) needs h_ref itself
        if "ref_logps" in inputs and not needs_ref_logits:  # computed once before training (docs/guarantees.md)
            ref_logits, ref_logps = None, inputs["ref_logps"].to(policy_logps.dtype)
        else:
            ref_logits = self._reference_logits(model, ids, attn)[:, :-1]
            with torch.no_grad():
                ref_logps = gather_logps(ref_logits, targets, mask)
        half = ids.shape[0] // 2
        pc, pr, rc, rr = policy_logps[:half], policy_logps[half:], ref_logps[:half], ref_logps[half:]
        margin = dpo_margin(pc, pr, rc, rr, self.beta)  # Eq. 5
        z = torch.zeros_like(margin)
        if self.refine is not None:
            z = self._refinement_flags(margin, logits, ref_logits, targets, mask, (rc, rr), inputs["row_ids"])
        alpha = self.refine.alpha if self.refine is not None else 0.0
        loss = self._pair_loss(margin, z, alpha, pc, pr, rc, rr, inputs)
        if spo:  # SPO Eq. 7: hidden states of the same forward pass, no extra pass
            loss = loss + self._spo_loss(out.hidden_states[-1], inputs)
        with torch.no_grad():
            self.stats.sums.add(
                loss=loss.item() * half, pairs=half, margin=margin.sum().item(), refined=z.sum().item(),
                logps_chosen=pc.sum().item(), logps_rejected=pr.sum().item(),
                rewards_chosen=implicit_reward(pc, rc, self.beta).sum().item(),  # Eq. 4
                rewards_correct=(margin > 0).sum().item())
            self.stats.lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
        return loss

    @torch.no_grad()
    def _refinement_flags(self, margin, logits, ref_logits, targets, mask, ref_pair, row_ids) -> torch.Tensor:
        """z of Eq. 10 for this micro-batch: the K% least confident of the moving window (Eq. 9), the
        confidence from the extrapolated model of Eq. 12 with DND on, pi_theta's own margin without.
        Both detectors' records are kept for ``refinement.parquet``."""
        step, total = self.state.global_step, max(1, self.state.max_steps)
        half = margin.shape[0]
        conf_sr = margin.detach()  # Eq. 9 with pi_theta's own confidence (margin ~ p, sigma monotone)
        dnd = self.refine.lam > 0
        if dnd:  # Eq. 12: confidence of the extrapolated model (logit level)
            tc = extrapolated_logps(logits, ref_logits, targets, mask, self.refine.lam)
            conf = dpo_margin(tc[:half], tc[half:], ref_pair[0], ref_pair[1], self.beta)
            self.window_sr.update(conf_sr)
            z_sr = self.window_sr.flags(conf_sr, step, total)
        else:
            conf = conf_sr
        self.window.update(conf)  # window includes the current batch (B.4)
        z_used = self.window.flags(conf, step, total)
        z_sr = z_sr if dnd else z_used
        self.stats.tau = self.window.tau
        for i, row in enumerate(row_ids.tolist()):
            self.samples.append(FlagRecord(row, step, conf_sr[i].item(), conf[i].item() if dnd else float("nan"),
                                           bool(z_sr[i]), bool(z_used[i]) if dnd else False))
        return z_used.to(margin.dtype)

    def _pair_loss(self, margin, z, alpha, pc, pr, rc, rr, inputs) -> torch.Tensor:
        """The configured pair loss over this micro-batch (the group of RPO and DRO)."""
        ls, stats = self.loss_settings, self.stats.variant
        if ls.kind is LossKind.RPO:
            emb = inputs["prompt_emb"]
            w = rpo_weights(emb, emb, ls.rpo.tau)
            stats["rpo_diag_weight"] = max(stats.get("rpo_diag_weight", 0.0), float(w.diagonal().mean()))
            refined = self.refine is not None
            return rpo_loss(pc, pr, rc, rr, emb, emb, self.beta, ls.rpo.tau, z_chosen=z if refined else None,
                            z_rejected=z if refined else None, alpha=alpha)
        if ls.kind.reweights:
            sr_first = ls.kind is LossKind.SR_DRO
            with torch.no_grad():
                keep = z == 0 if sr_first else torch.ones_like(z, dtype=torch.bool)
                if bool(keep.any()):  # the step's largest of each over its micro-batches
                    for name, value in dro_diagnostics(torch.sigmoid(margin.detach()[keep]), ls.dro.eps, ls.dro.xi_min).items():
                        stats[name] = max(stats.get(name, 0.0), value)
            return dro_dpo_loss(margin, ls.dro.eps, ls.dro.xi_min, z=z if sr_first else None, alpha=alpha).mean()
        return refined_dpo_loss(margin, z, alpha).mean()  # Eq. 10 (Eq. 6 when z = 0)

    def finish_step(self, step: int) -> dict[str, Any]:
        """Reduce this optimiser step's statistics across ranks into one ``train_log`` row."""
        mean = self.stats.sums.reduced(self.accelerator).means()
        row = {
            "step": step, "loss": mean["loss"], "lr": float(self.stats.lr), "margin_mean": mean["margin"],
            "tau": self.stats.tau, "refined_fraction": mean["refined"], "logps_chosen": mean["logps_chosen"],
            "logps_rejected": mean["logps_rejected"], "rewards_chosen": mean["rewards_chosen"],
            "rewards_accuracies": mean["rewards_correct"], **self.stats.variant,
        }
        if self.spo_heads is not None:
            counts = torch.tensor(self.spo_counts, dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            c = counts.cpu().tolist()
            row["spo_acc_pref"] = c[0] / c[1] if c[1] else None
            row["spo_acc_dispref"] = c[2] / c[3] if c[3] else None
            self.spo_counts = [0, 0, 0, 0]
        if self.unpaired_kind:
            self._finish_unpaired_step(row)
        if step == 1 and abs(row["margin_mean"]) > 1e-2 and self.sspo_state is None:  # SSPO: no reference
            log.warning("step 1 margin %.4f: policy and reference differ at the start (mismatched reference?)",
                        row["margin_mean"])
        self.rows.append(row)
        self.stats.reset()
        return row


class _SPACallback(TrainerCallback):
    def __init__(self, trainer: RefinedDPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        row = self.trainer.finish_step(state.global_step)
        # TRL's metric names, for users comparing runs; logged with Trainer's own dict of this step (log)
        self.trainer.step_logs = ({
            "loss": row["loss"], "learning_rate": row["lr"],
            "rewards/margins": row["margin_mean"], "rewards/accuracies": row["rewards_accuracies"],
            "logps/chosen": row["logps_chosen"], "logps/rejected": row["logps_rejected"],
            "refined_fraction": row["refined_fraction"],
        } | ({"tau": row["tau"]} if row["tau"] is not None else {}))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        heads = self.trainer.spo_heads
        if heads is None or self.trainer.accelerator.num_processes < 2:
            return
        import torch.distributed as dist

        # the heads live outside the DDP wrapper: average their gradients like DDP does for the policy
        for p in heads.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()

    def on_save(self, args, state, control, **kwargs):
        tr = self.trainer
        if tr.spo_heads is not None and state.is_world_process_zero:
            from safetensors.torch import save_file

            save_file(tr.spo_heads.state_dict(), str(Path(args.output_dir) / f"checkpoint-{state.global_step}" / SPO_HEADS))
        samples = gather_samples(tr.samples)
        pseudo = gather_samples(tr.pseudo_labels, PseudoLabel) if tr.sspo_state is not None else []
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        payload = {
            "rows": tr.rows,
            "window": tr.window.state() if tr.window is not None else [],
            "window_sr": tr.window_sr.state() if tr.window_sr is not None else [],
            "samples": samples,
        } | ({"sspo": tr.sspo_state.state_dict(), "pseudo_labels": pseudo} if tr.sspo_state is not None else {})
        (ckpt / STATE_FILE).write_text(json.dumps(payload))


def gather_samples(samples: list, record: type = FlagRecord) -> list:
    """Every rank's per-sample records (refinement flags, SSPO's pseudo-labels; identity without data parallelism),
    ordered by step and row."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, [tuple(s) for s in samples])
        samples = [record(*s) for part in parts for s in part]
    return sorted(samples, key=lambda s: (s.step, s.row))


def samples_to_table(samples: list[FlagRecord], prompt_ids: list[str]) -> pa.Table:
    """``refinement.parquet``: per training sample, both detectors' confidences and flags."""
    columns = {name: [getattr(s, name) for s in samples] for name in FlagRecord._fields if name != "row"}
    return pa.table({"prompt_id": [prompt_ids[s.row] for s in samples], **columns}, schema=REFINEMENT.schema)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRAIN_LOG_WRITTEN)
