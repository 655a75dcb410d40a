"""Refined DPO training on transformers' ``Trainer`` (Eq. 6, 9-12).

The optimiser, cosine schedule with warm-up, gradient accumulation and
checkpointing, data parallelism (``accelerate launch``/``torchrun``), bf16 and
gradient checkpointing all come from ``Trainer``; only the SPA loss is ours
(:meth:`RefinedDPOTrainer.compute_loss`). With LoRA the reference is the same
weights with the adapter disabled (no second copy in memory).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from spa.models.logprobs import Encoded, collate, encode_pair, gather_logps
from spa.training.losses import (
    RefinementWindow,
    dpo_margin,
    dro_dpo_loss,
    dro_weights,
    extrapolated_logps,
    refined_dpo_loss,
    rpo_loss,
)
from spa.training.spo import SPOHeads, SPOSettings, aux_loss, step_generator

log = logging.getLogger(__name__)
STATE_FILE = "spa_state.json"
SPO_HEADS = "spo_heads.safetensors"  # SPO's heads, beside (not inside) the policy weights


@dataclass(frozen=True)
class RefineSettings:
    """Self-refinement (Eq. 9-10) and de-coupled detection (Eq. 11-12) for one training run."""

    alpha: float = 0.1
    k_percent: float = 10.0
    window: int = 50
    warmup_fraction: float = 0.2
    lam: float = 0.0  # 0 = SR only (confidence from pi_theta itself)


@dataclass(frozen=True)
class LossSettings:
    """Which pair loss trains (VARIANTS.md): ``dpo`` (Eq. 6/10), ``rpo``, ``dro``, ``sr+dro``."""

    kind: str = "dpo"
    rpo_tau: float = 0.5
    dro_eps: float = 0.01
    dro_xi_min: float = 0.1
    spo: SPOSettings | None = None  # SPO: refined DPO + gamma * (CE_pref + CE_dispref)
    seed: int = 0


class PairDataset(Dataset):
    """Rendered (chosen, rejected) pairs; rendering goes through :mod:`spa.models.rendering`."""

    def __init__(self, tok: PreTrainedTokenizerBase, prompts, chosen, rejected, max_length: int,
                 chosen_finished=None, rejected_finished=None, prompt_emb=None, key_phrases: bool = False):
        n = len(prompts)
        self.prompt_emb = torch.as_tensor(prompt_emb, dtype=torch.float32) if prompt_emb is not None else None
        self.spans = None
        if key_phrases:  # SPO: RAKE key phrases as response-token indices, once per run (VARIANTS.md 1.3)
            from spa.training.rake import key_phrase_token_spans

            def info(text: str) -> tuple[list[list[int]], int]:
                return key_phrase_token_spans(tok, text), len(tok(text, add_special_tokens=False)["input_ids"])

            self.spans = [(info(c), info(r)) for c, r in zip(chosen, rejected, strict=True)]
        cf = chosen_finished if chosen_finished is not None else [True] * n
        rf = rejected_finished if rejected_finished is not None else [True] * n
        self.items = [
            (encode_pair(tok, p, c, fc, max_length, row=i), encode_pair(tok, p, r, fr, max_length, row=i))
            for i, (p, c, r, fc, fr) in enumerate(zip(prompts, chosen, rejected, cf, rf, strict=True))
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


class PairCollator:
    """Chosen sequences first, then rejected ones, right-padded together."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, Encoded]]) -> dict[str, torch.Tensor]:
        seqs = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        batch = collate(seqs, self.pad_id)
        out = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "target_ids": batch["labels"],  # not "labels": Trainer must not count tokens for its own loss
            "loss_mask": batch["loss_mask"],
            "row_ids": torch.tensor([f["row"] for f in features], dtype=torch.long),
        }
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


class _StepStats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(8, dtype=torch.float64)  # loss, n, margin, refined, pc, pr, rew_c, rew_acc
        self.variant: dict[str, float] = {}  # per-step statistics of a loss variant (max over micro-batches)
        self.tau: float | None = None
        self.lr: float = 0.0


class RefinedDPOTrainer(Trainer):
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
        self.rows: list[dict[str, Any]] = []
        self.samples: list[list] = []  # [row, step, conf_sr, conf_dnd, z_sr, z_dnd] per training sample
        if resume_state:
            self.rows = resume_state["rows"]
            if self.window is not None:
                self.window.load(resume_state["window"])
            if self.window_sr is not None:
                self.window_sr.load(resume_state.get("window_sr", []))
            is_main = int(__import__("os").environ.get("RANK", "0")) == 0
            self.samples = resume_state.get("samples", []) if is_main else []
        self.add_callback(_SPACallback(self))

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
        ids, attn = inputs["input_ids"], inputs["attention_mask"]
        targets, mask = inputs["target_ids"], inputs["loss_mask"]
        spo = self.spo_heads is not None
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=spo, use_cache=False)
        logits = out.logits[:, :-1]
        policy_logps = gather_logps(logits, targets, mask)
        needs_ref_logits = self.refine is not None and self.refine.lam > 0  # DND (Eq. 12) needs h_ref itself
        if "ref_logps" in inputs and not needs_ref_logits:  # computed once before training (PITFALLS)
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
            step, total = self.state.global_step, max(1, self.state.max_steps)
            with torch.no_grad():
                conf_sr = margin.detach()  # Eq. 9 with pi_theta's own confidence (margin ~ p, sigma monotone)
                if self.refine.lam > 0:  # Eq. 12: confidence of the extrapolated model (logit level)
                    tc = extrapolated_logps(logits, ref_logits, targets, mask, self.refine.lam)
                    conf = dpo_margin(tc[:half], tc[half:], rc, rr, self.beta)
                    self.window_sr.update(conf_sr)
                    z_sr = self.window_sr.flags(conf_sr, step, total)
                else:
                    conf = conf_sr
                self.window.update(conf)  # window includes the current batch (B.4)
                z_used = self.window.flags(conf, step, total)
                if self.refine.lam == 0:
                    z_sr = z_used
                z = z_used.to(margin.dtype)
                self.stats.tau = self.window.tau
                nan = float("nan")
                for i, row in enumerate(inputs["row_ids"].tolist()):
                    self.samples.append([row, step, conf_sr[i].item(), conf[i].item() if self.refine.lam > 0 else nan,
                                         bool(z_sr[i]), bool(z_used[i]) if self.refine.lam > 0 else False])
        alpha = self.refine.alpha if self.refine is not None else 0.0
        loss = self._pair_loss(margin, z, alpha, pc, pr, rc, rr, inputs)
        if spo:  # SPO Eq. 7: hidden states of the same forward pass, no extra pass
            loss = loss + self._spo_loss(out.hidden_states[-1], inputs)

        with torch.no_grad():
            chosen_reward = self.beta * (pc - rc)
            self.stats.sums += torch.tensor([
                loss.item() * half, half, margin.sum().item(), z.sum().item(), pc.sum().item(), pr.sum().item(),
                chosen_reward.sum().item(), (margin > 0).sum().item(),
            ], dtype=torch.float64)
            self.stats.lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else 0.0
        return loss

    def _pair_loss(self, margin, z, alpha, pc, pr, rc, rr, inputs) -> torch.Tensor:
        """The configured pair loss over this micro-batch (the group of RPO and DRO)."""
        ls, stats = self.loss_settings, self.stats.variant
        if ls.kind == "rpo":
            emb = inputs["prompt_emb"]
            with torch.no_grad():
                e = torch.nn.functional.normalize(emb.float(), dim=-1)
                w = torch.softmax(-(1.0 - e @ e.T) / ls.rpo_tau, dim=1)
                stats["rpo_diag_weight"] = max(stats.get("rpo_diag_weight", 0.0), float(w.diagonal().mean()))
            refined = self.refine is not None
            return rpo_loss(pc, pr, rc, rr, emb, emb, self.beta, ls.rpo_tau, z_chosen=z if refined else None,
                            z_rejected=z if refined else None, alpha=alpha)
        if ls.kind in ("dro", "sr+dro"):
            with torch.no_grad():
                keep = z == 0 if ls.kind == "sr+dro" else torch.ones_like(z, dtype=torch.bool)
                if bool(keep.any()):
                    w = dro_weights(torch.sigmoid(margin.detach()[keep]), ls.dro_eps, ls.dro_xi_min)
                    stats["dro_max_weight"] = max(stats.get("dro_max_weight", 0.0), float(w.max()))
            zz = z if ls.kind == "sr+dro" else None
            return dro_dpo_loss(margin, ls.dro_eps, ls.dro_xi_min, z=zz, alpha=alpha).mean()
        return refined_dpo_loss(margin, z, alpha).mean()  # Eq. 10 (Eq. 6 when z = 0)

    def finish_step(self, step: int) -> dict[str, Any]:
        """Reduce this optimiser step's statistics across ranks into one ``train_log`` row."""
        sums = self.stats.sums.to(self.accelerator.device)
        sums = self.accelerator.reduce(sums, reduction="sum") if self.accelerator.num_processes > 1 else sums
        sums = sums.cpu()
        n = max(1.0, sums[1].item())
        row = {
            "step": step,
            "loss": sums[0].item() / n,
            "lr": float(self.stats.lr),
            "margin_mean": sums[2].item() / n,
            "tau": self.stats.tau,
            "refined_fraction": sums[3].item() / n,
            "logps_chosen": sums[4].item() / n,
            "logps_rejected": sums[5].item() / n,
            "rewards_chosen": sums[6].item() / n,
            "rewards_accuracies": sums[7].item() / n,
            **self.stats.variant,
        }
        if self.spo_heads is not None:
            counts = torch.tensor(self.spo_counts, dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                counts = self.accelerator.reduce(counts, reduction="sum")
            c = counts.cpu().tolist()
            row["spo_acc_pref"] = c[0] / c[1] if c[1] else None
            row["spo_acc_dispref"] = c[2] / c[3] if c[3] else None
            self.spo_counts = [0, 0, 0, 0]
        if step == 1 and abs(row["margin_mean"]) > 1e-2:
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
        # TRL's metric names (STYLE.md 13), for users comparing runs
        self.trainer.log({
            "rewards/margins": row["margin_mean"], "rewards/accuracies": row["rewards_accuracies"],
            "logps/chosen": row["logps_chosen"], "logps/rejected": row["logps_rejected"],
            "refined_fraction": row["refined_fraction"],
        })

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
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        payload = {
            "rows": tr.rows,
            "window": tr.window.state() if tr.window is not None else [],
            "window_sr": tr.window_sr.state() if tr.window_sr is not None else [],
            "samples": samples,
        }
        (ckpt / STATE_FILE).write_text(json.dumps(payload))


def gather_samples(samples: list[list]) -> list[list]:
    """Every rank's per-sample refinement records (identity without data parallelism), ordered by step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, samples)
        samples = [s for part in parts for s in part]
    return sorted(samples, key=lambda s: (s[1], s[0]))


TRAIN_LOG_SCHEMA = pa.schema([
    ("step", pa.int64()), ("loss", pa.float64()), ("lr", pa.float64()), ("margin_mean", pa.float64()),
    ("tau", pa.float64()), ("refined_fraction", pa.float64()), ("logps_chosen", pa.float64()),
    ("logps_rejected", pa.float64()), ("rewards_chosen", pa.float64()), ("rewards_accuracies", pa.float64()),
    ("rpo_diag_weight", pa.float64()),  # RPO: mean weight of a pair's own entry (VARIANTS.md 2.6, item 2)
    ("dro_max_weight", pa.float64()),  # DRO: the largest pair weight of the step (VARIANTS.md 3.3, item 7)
    ("spo_acc_pref", pa.float64()), ("spo_acc_dispref", pa.float64()),  # SPO heads' accuracy (paper: > 90%)
])


REFINEMENT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("step", pa.int64()), ("confidence_sr", pa.float64()),
    ("confidence_dnd", pa.float64()), ("z_sr", pa.bool_()), ("z_dnd", pa.bool_()),
])


def samples_to_table(samples: list[list], prompt_ids: list[str]) -> pa.Table:
    """``refinement.parquet``: per training sample, both detectors' confidences and flags."""
    return pa.table({
        "prompt_id": [prompt_ids[s[0]] for s in samples], "step": [s[1] for s in samples],
        "confidence_sr": [s[2] for s in samples], "confidence_dnd": [s[3] for s in samples],
        "z_sr": [s[4] for s in samples], "z_dnd": [s[5] for s in samples],
    }, schema=REFINEMENT_SCHEMA)


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=TRAIN_LOG_SCHEMA)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[1])) if found else None


def prepare_checkpoint_dir(ckpt_dir: Path, run_key: str) -> Path | None:
    """Return the checkpoint to resume from, if it belongs to this exact run; else start clean."""
    key_file = ckpt_dir / "run_key.txt"
    if ckpt_dir.exists() and (not key_file.exists() or key_file.read_text() != run_key):
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(run_key)
    return latest_checkpoint(ckpt_dir)
