"""The one typed, validated configuration of a SPA run.

Defaults are the paper's (Kim et al., ICLR 2025, Sec. 5.1 and Appendix B.4)
and live in the section modules (``sections``, ``training``). Unknown keys, wrong types and out-of-range values are
errors. The resolved config is saved as ``<run>/config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, model_validator

from spa.config.hub import resolve_model_refs  # hub ids -> snapshot directories, once, at load time
from spa.config.sections import (
    OPERATIONAL,
    PI_INIT_UNPAIRED,
    DataConfig,
    EvalConfig,
    Fraction,
    JudgeConfig,
    JudgeEndpoint,
    ModelConfig,
    MTBenchConfig,
    PositiveInt,
    SampleConfig,
    _Section,
)
from spa.config.training import (
    DPOSFTConfig,
    DROConfig,
    LoraConfig,
    LossKind,
    RefinementConfig,
    RPOConfig,
    SPOConfig,
    SSPOConfig,
    TrainConfig,
)
from spa.errors import ConfigError

__all__ = [
    "OPERATIONAL", "PI_INIT_UNPAIRED", "DataConfig", "DPOSFTConfig", "DROConfig", "EvalConfig", "Fraction", "JudgeConfig", "JudgeEndpoint", "LoraConfig",
    "LossKind", "ModelConfig", "MTBenchConfig", "PositiveInt", "RPOConfig", "RefinementConfig", "SampleConfig",
    "SPAConfig", "SPOConfig", "SSPOConfig", "TrainConfig", "load_config", "parse_config",
]


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
        if (j.type == "verifier" or j.oracle == "verifier") and not j.instructions:
            raise ValueError("judge.type verifier and judge.oracle verifier need judge.instructions: the file of "
                             "IFEval-format rows (prompt, instruction_id_list, kwargs) of the run's prompts")
        if j.type == "verifier" and j.length_penalty != 0:
            raise ValueError("judge.type verifier labels by the constraints followed: set judge.length_penalty: 0")
        if j.policy_logps == "from_sampling" and j.type != "implicit":
            raise ValueError("judge.policy_logps: from_sampling reuses pi_{t-1}'s sampling log-probs, which only the "
                             "implicit-reward judge uses: set judge.type: implicit or policy_logps: rescore")
        return self

    @model_validator(mode="after")
    def _unpaired_set_given(self) -> SPAConfig:
        if self.train.loss.uses_unpaired and not self.data.unpaired_source:
            raise ValueError(f"train.loss {self.train.loss.value!r} trains on an unpaired set: set data.unpaired_source "
                             "(rows of prompt and response, or 'messages'; spa prepare writes <run>/data/unpaired.parquet; "
                             f"or {PI_INIT_UNPAIRED!r}: one pi_init sample per prompt of the run's prompt batches)")
        if self.data.unpaired_source == PI_INIT_UNPAIRED and self.iterations == 0:
            raise ValueError(f"data.unpaired_source: {PI_INIT_UNPAIRED} samples pi_init on the run's prompt batches "
                             "X_1..X_T, and the run has none (iterations: 0): raise iterations (and data.prompt_sizes) "
                             "or give a file of unpaired rows")
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

    return parse_config(resolve_model_refs(raw), where=str(path))


def parse_config(raw: dict[str, Any], where: str = "<config>") -> SPAConfig:
    """Validate a config mapping; errors name every bad key."""
    try:
        return SPAConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<top>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}: invalid config: {problems}") from None
