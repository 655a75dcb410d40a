"""One training round resolved from the config: what ``spa seed`` / ``spa train -t t`` will do.

The train stage, ``spa plan`` and the report all read this object instead of re-deriving the
decisions from the config (which model starts, which reference, which loss and what it needs,
whether self-refinement and DND apply, whether the reference log-probs are computed once, which
files the round writes). It reads only the config and the run layout (no torch import), so a stage
that is already up to date answers without loading torch. Decisions: docs/algorithm.md ("Seed
stage", "Iteration t = 1..T", "Which reference where") and docs/variants.md 3.3 (DRO's rounds).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from spa.config import (
    DPOSFTConfig,
    DROConfig,
    LossKind,
    RefinementConfig,
    RPOConfig,
    SPAConfig,
    SPOConfig,
    SSPOConfig,
)
from spa.run.layout import RunLayout, model_dir
from spa.run.manifest import Stage


@dataclass(frozen=True)
class RefineSettings:
    """Self-refinement (Eq. 9-10) and de-coupled detection (Eq. 11-12) of one round.

    The values come from ``train.refinement`` (its defaults are the paper's); ``lam`` is this round's
    lambda of Eq. 12, 0 for SR alone (the confidence is then pi_theta's own)."""

    alpha: float
    k_percent: float
    window: int
    warmup_fraction: float
    lam: float

    @classmethod
    def from_config(cls, r: RefinementConfig, lam: float) -> RefineSettings:
        return cls(r.alpha, r.k_percent, r.window, r.warmup_fraction, lam)


@dataclass(frozen=True)
class LossSettings:
    """The pair loss of one round with its parameters (the config sections themselves: one home of defaults)."""

    kind: LossKind = LossKind.DPO
    rpo: RPOConfig = RPOConfig()
    dro: DROConfig = DROConfig()
    spo: SPOConfig | None = None  # SPO only: refined DPO + gamma * (CE_pref + CE_dispref)
    seed: int = 0
    sspo: SSPOConfig = SSPOConfig()
    dpo_sft: DPOSFTConfig = DPOSFTConfig()


@dataclass(frozen=True)
class TrainRound:
    """Round ``t`` of a run (``t = 0``: the seed stage), every decision taken once."""

    t: int
    start: Path  # pi_init (seed stage) or pi_{t-1}; the reference is the same model
    data: Path  # the seed set or iteration t's judgments
    unpaired: Path | None  # SSPO / DPO+SFT in the seed stage: <run>/data/unpaired.parquet, trained on beside the pairs
    loss: LossSettings
    refine: RefineSettings | None
    precompute_reference: bool  # reference log-probs once, before training: no reference model in memory
    training_set: Path | None  # iter_t/train_pairs.parquet when the pairs are materialised (replay, RPO)
    epochs: float
    precision: str  # train.precision: auto, fp32 or bf16 (see ``bf16``)
    outputs: tuple[Path, ...]
    stage_key: str

    @property
    def dnd_lambda(self) -> float:
        """lambda of Eq. 12 (0: DND off)."""
        return self.refine.lam if self.refine is not None else 0.0

    @property
    def needs_reference(self) -> bool:
        """SSPO's (SimPO) reward is reference-free: no reference model and no reference log-probs; with
        ``train.sspo.reward: implicit`` it is DPO's, against pi_init."""
        return self.loss.kind is not LossKind.SSPO or self.loss.sspo.reward == "implicit"

    @property
    def inputs(self) -> list[Path]:
        """What the stage's resume key is taken over: the start model, the pairs and (SSPO, DPO+SFT) the unpaired set."""
        return [self.start, self.data] + ([self.unpaired] if self.unpaired is not None else [])

    @property
    def refines(self) -> bool:
        return self.refine is not None

    @property
    def start_name(self) -> str:
        return "pi_init" if self.t == 0 else f"pi_{self.t - 1}"

    @cached_property
    def bf16(self) -> bool:
        """Train in bf16: ``bf16``, or ``auto`` on a GPU that supports it (the one place that decides it)."""
        if self.precision != "auto":
            return self.precision == "bf16"
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def loss_kind(cfg: SPAConfig, t: int) -> LossKind:
    """DRO reweights the self-labelled rounds only (docs/variants.md 3.3) unless ``train.dro.seed_stage``; SSPO and
    DPO+SFT are seed-stage losses (docs/variants.md 7): the iterations after them are SPA's (SSPO then SPA)."""
    kind = cfg.train.loss
    if kind.reweights and t == 0 and not cfg.train.dro.seed_stage:
        return LossKind.DPO
    if kind.uses_unpaired and t > 0:
        return LossKind.DPO
    return kind


def resolve_round(cfg: SPAConfig, t: int) -> TrainRound:
    """Round ``t`` of ``cfg``, resolved (``t = 0``: DPO of pi_init on D_0; ``t >= 1``: refined DPO from pi_{t-1})."""
    tc, layout = cfg.train, RunLayout.of(cfg)
    kind = loss_kind(cfg, t)
    refine = None
    if t > 0 and tc.refinement.self_refine and kind.allows_refinement:
        refine = RefineSettings.from_config(tc.refinement, tc.refinement.lam(t) if tc.refinement.decoupled else 0.0)
    loss = LossSettings(kind, tc.rpo, tc.dro, tc.spo if kind.needs_key_phrases else None, tc.seed, tc.sspo, tc.dpo_sft)
    # FSDP with LoRA: no pass before training (no rank could hold the whole base on its device for it); the
    # reference is the sharded base with the adapter disabled, at no memory cost
    precompute = (tc.precompute_reference and (refine is None or refine.lam == 0) and not tc.shards_lora
                  and kind is not LossKind.SSPO)  # SSPO: no reference, or (reward: implicit) a reference model
    materialised = (t > 0 and tc.replay_fraction > 0) or kind.needs_prompt_embeddings
    outputs = [layout.model(t), layout.train_log(t)]
    outputs += [layout.refinement(t)] if refine is not None else []
    outputs += [layout.train_pairs(t)] if materialised else []
    outputs += [layout.reference_logps(t)] if precompute else []
    outputs += [layout.spo_heads(t)] if kind.needs_key_phrases else []
    outputs += [layout.pseudo_labels(t)] if kind is LossKind.SSPO else []
    return TrainRound(
        t=t, start=Path(cfg.model.pi_init) if t == 0 else model_dir(cfg, t - 1),
        data=layout.seed if t == 0 else layout.judgments(t), unpaired=layout.unpaired if kind.uses_unpaired else None,
        loss=loss, refine=refine,
        precompute_reference=precompute, training_set=layout.train_pairs(t) if materialised else None,
        epochs=tc.seed_epochs if t == 0 else tc.epochs, precision=tc.precision, outputs=tuple(outputs),
        stage_key=Stage.TRAIN.key(t),
    )
