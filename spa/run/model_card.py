"""A model card (``README.md`` in the Hugging Face Hub's format) for every model a run writes.

``iter_t/model/README.md`` says what the model is: a YAML header the Hub reads (``base_model``,
``library_name``, ``tags``, ``datasets`` where known), its lineage (pi_init, the model it was trained from,
the round's data by content hash), the round's resolved config, and the iteration's evaluation numbers
once ``eval.json`` exists. The train stage writes the card with the model; the evaluate stage writes it
again with the numbers. The card is metadata, not weights: directory hashes leave it out
(:func:`spa.run.manifest.dir_sha256`), so writing it never makes a finished stage look changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from spa.config import SPAConfig
from spa.run.artifacts import write_text_atomic
from spa.run.layout import RunLayout

CARD = "README.md"
EVAL_KEYS = ("win_rate", "lc_win_rate", "standard_error", "gold_agreement", "avg_length", "n", "annotator",
             "eval_set")


def _model_ref(cfg: SPAConfig, setting: str, value: str) -> str:
    ref = cfg.model.hub_refs.get(setting)
    return f"{ref['repo_id']}@{ref['commit']}" if ref else value


def _file_hash(path: Path) -> str:
    from spa.run.manifest import content_hash

    return content_hash(path)[:16] if path.exists() else "(not written yet)"


def lineage(cfg: SPAConfig, t: int) -> dict[str, str]:
    """Where pi_t comes from: pi_init, the model it was trained from, its data (content hashes)."""
    lay = RunLayout.of(cfg)
    out = {"pi_init": _model_ref(cfg, "model.pi_init", cfg.model.pi_init)}
    if t == 0:
        out |= {"trained from": "pi_init (the seed stage: DPO on the gold seed pairs)",
                "training data": f"data/seed.parquet sha256 {_file_hash(lay.seed)}"}
    else:
        out |= {"trained from": f"pi_{t - 1} (iter_{t - 1}/model), also the DPO reference",
                "prompts": f"data/prompts_{t}.parquet sha256 {_file_hash(lay.prompts(t))}",
                "training data": f"iter_{t}/judgments.parquet sha256 {_file_hash(lay.judgments(t))} "
                                 f"(pairs sampled from pi_{t - 1}, labelled by its implicit reward)"}
    return out


def card_text(cfg: SPAConfig, t: int, evaluation: dict[str, Any] | None) -> str:
    """The card of pi_t: Hub header, lineage, evaluation (when known) and the round's resolved config."""
    ref = cfg.model.hub_refs.get("model.pi_init")
    header: dict[str, Any] = {"base_model": ref["repo_id"] if ref else Path(cfg.model.pi_init).name,
                              "library_name": "transformers",
                              "tags": ["spa", "dpo", "spread-preference-annotation", f"spa-iteration-{t}"]}
    source = cfg.data.source or ""
    if source and not Path(source).exists() and "/" in source:  # a hub dataset id
        header["datasets"] = [source]
    name = Path(cfg.run_dir).name
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {name}: pi_{t}", "",
             f"Iteration {t} of {cfg.iterations} of a Spread Preference Annotation run (SPA, Kim et al., ICLR 2025) "
             "written by spa-pipeline." if t else
             "The seed-stage model of a Spread Preference Annotation run (SPA, Kim et al., ICLR 2025): pi_init "
             "after DPO on the gold seed preferences, written by spa-pipeline.", "",
             "## Lineage", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in lineage(cfg, t).items()]
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| " + " | ".join(k for k in EVAL_KEYS if k in evaluation) + " |",
                  "|" + "---|" * sum(k in evaluation for k in EVAL_KEYS),
                  "| " + " | ".join(str(evaluation[k]) for k in EVAL_KEYS if k in evaluation) + " |",
                  "", f"From `iter_{t}/eval.json`."]
    else:
        lines.append(f"Not evaluated yet (`spa evaluate --iteration {t}` writes `iter_{t}/eval.json`).")
    resolved = {k: v for k, v in cfg.model_dump(mode="json").items() if k in ("model", "data", "train", "judge",
                                                                          "sample")}
    lines += ["", "## The round's config (resolved)", "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).strip(),
              "```", ""]
    return "\n".join(lines)


def write_model_card(cfg: SPAConfig, t: int) -> Path | None:
    """Write ``iter_t/model/README.md`` (None when the run has no model directory of its own for ``t``)."""
    lay = RunLayout.of(cfg)
    model = lay.model(t)
    if not model.is_dir():
        return None
    summary = lay.eval_summary(t)
    evaluation = json.loads(summary.read_text()) if summary.exists() else None
    return write_text_atomic(model / CARD, card_text(cfg, t, evaluation))
