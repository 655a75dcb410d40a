"""Checks of a run's files before any server starts or any model loads.

A config can be valid as a document and still name a model directory that does not exist; the
stage that first opens it would then fail minutes in (under ``spa run``, after Prefect's server
started). ``preflight`` looks at what must exist on disk now and raises one ``ConfigError`` listing
every problem. It reads no weights (a directory holding ``config.json`` or ``adapter_config.json``
counts as a model) and imports no torch.
"""

from __future__ import annotations

import re
from pathlib import Path

from spa.config import SPAConfig
from spa.errors import ConfigError
from spa.run.layout import RunLayout

MODEL_MARKERS = ("config.json", "adapter_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv", ".tsv")


def is_hub_dataset_id(value: str) -> bool:
    """``org/name`` that names no local path and no data file: ``spa.data.sources`` reads it from the hub
    (or its local cache), and whether it exists there is that stage's check, not one of the filesystem."""
    return bool(_HUB_ID.match(value)) and Path(value).suffix.lower() not in _DATA_SUFFIXES and not Path(value).exists()


def _model_problem(key: str, value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        return f"{key}: {value} is not a directory (give a local model folder, or a hub id org/name[@revision]: not in the local hub cache either)"
    if not any((path / m).exists() for m in MODEL_MARKERS):
        return f"{key}: {value} holds no config.json or adapter_config.json (not a model folder)"
    return None


def problems(cfg: SPAConfig) -> list[str]:
    """Everything a run needs on disk now that is missing (empty when the run can start)."""
    layout = RunLayout.of(cfg)
    found = [_model_problem("model.pi_init", cfg.model.pi_init), _model_problem("model.pi_0", cfg.model.pi_0)]
    if cfg.judge.type == "llm_judge":
        found.append(_model_problem("judge.llm_judge_model", cfg.judge.llm_judge_model))
    if not layout.seed.exists():  # prepare has not run yet: it will read the source
        source = cfg.data.source
        if not source:
            found.append("data.source: not set (the preference file `spa prepare` splits)")
        elif not Path(source).exists() and not is_hub_dataset_id(source):
            found.append(f"data.source: {source} does not exist")
    eval_set = cfg.evaluate.eval_set
    if eval_set not in ("alpaca_eval", "heldout", "none") and not Path(eval_set).exists():
        found.append(f"evaluate.eval_set: {eval_set} does not exist")
    found += [f"evaluate.instruction_sets: {s} does not exist ('ifeval' or a file of IFEval-format rows)"
              for s in cfg.evaluate.instruction_sets if s != "ifeval" and not Path(s).exists()]
    if cfg.judge.instructions and not Path(cfg.judge.instructions).exists():
        found.append(f"judge.instructions: {cfg.judge.instructions} does not exist (the verifiable-instruction rows "
                     "of the run's prompts)")
    return [p for p in found if p]


def preflight(cfg: SPAConfig, where: str = "<config>") -> None:
    """Raise ``ConfigError`` naming every missing file or folder of the run (see :func:`problems`)."""
    found = problems(cfg)
    if found:
        raise ConfigError(f"{where}: the run cannot start: " + "; ".join(found))
