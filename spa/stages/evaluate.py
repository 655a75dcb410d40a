"""``spa evaluate --iteration t``: held-out gold agreement and response length statistics.

Gold agreement is the share of held-out gold pairs where ``pi_t``'s implicit reward
against ``pi_init`` (Eq. 4) prefers the gold ``chosen``. Outputs for the held-out
prompts are written in alpaca-eval's column names (instruction, output, generator).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from spa.annotators import annotate, load_annotator, win_rate
from spa.artifacts import read_table, write_table, write_text_atomic
from spa.config import SPAConfig
from spa.layout import RunLayout, model_dir
from spa.stages.runner import StageResult, require, run_stage

SECTIONS = ["model", "evaluate", "judge"]


def gold_agreement(cfg: SPAConfig, t: int, heldout: pa.Table) -> float:
    """Share of gold pairs with ``r_t(chosen) > r_t(rejected)``, ``r`` against ``pi_init``."""
    import torch

    from spa.judge import implicit_reward
    from spa.logprobs import sequence_logps
    from spa.models import load_causal_lm
    from spa.rendering import load_tokenizer

    trc, dtype = cfg.model.trust_remote_code, cfg.model.dtype
    tok = load_tokenizer(model_dir(cfg, t), trc)
    prompts = heldout.column("prompt").to_pylist()
    both_p = prompts + prompts
    both_y = heldout.column("chosen").to_pylist() + heldout.column("rejected").to_pylist()
    scores = {}
    for name, path in (("policy", model_dir(cfg, t)), ("ref", Path(cfg.model.pi_init))):
        model = load_causal_lm(path, dtype, trust_remote_code=trc)
        scores[name], _ = sequence_logps(model, tok, both_p, both_y, None, cfg.judge.batch_size, cfg.model.max_length,
                                         progress=f"gold agreement ({name})")
        del model
    n = len(prompts)
    reward = implicit_reward(torch.from_numpy(scores["policy"]), torch.from_numpy(scores["ref"]), cfg.judge.beta).numpy()
    return float(np.mean(reward[:n] > reward[n:])) if n else float("nan")


def load_reference(path: Path) -> dict[str, list[str]]:
    """Reference outputs (alpaca-eval JSON list or Parquet with instruction/output columns)."""
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
    else:
        rows = read_parquet_rows(path)
    try:
        return {"instruction": [r["instruction"] for r in rows], "output": [r["output"] for r in rows]}
    except KeyError as exc:
        raise ValueError(f"{path}: reference outputs need 'instruction' and 'output' ({exc} missing)") from None


def read_parquet_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print) -> StageResult:
    layout = RunLayout(Path(cfg.run_dir))
    heldout_path = require(layout.heldout, "the held-out gold set", "spa prepare")
    model = require(model_dir(cfg, t), f"pi_{t}", "spa seed" if t == 0 else f"spa train --iteration {t}")
    outputs = [layout.eval_table(t), layout.eval_summary(t), layout.iteration(t) / "model_outputs.json"]

    def body() -> dict[str, Any]:
        from spa.sampling import SamplingSpec, make_sampler, vllm_available

        heldout = read_table(heldout_path, "heldout")
        agreement = gold_agreement(cfg, t, heldout)
        ec = cfg.evaluate
        if ec.reference_outputs:
            reference = load_reference(Path(ec.reference_outputs))
            prompts = reference["instruction"]
        else:
            reference, prompts = None, heldout.column("prompt").to_pylist()[: ec.max_prompts]
        spec = SamplingSpec(n=1, temperature=ec.temperature, max_new_tokens=ec.max_new_tokens, seed=cfg.sample.seed,
                            batch_size=ec.batch_size, max_length=cfg.model.max_length, dtype=cfg.model.dtype,
                            trust_remote_code=cfg.model.trust_remote_code)
        backend = cfg.sample.backend if cfg.sample.backend != "vllm" or vllm_available() else "transformers"
        if backend != cfg.sample.backend:
            echo(f"[evaluate/{t}] vLLM is not importable here; answering with the transformers backend")
        samples = make_sampler(backend, model, spec)(prompts, progress=f"evaluate iter {t}")
        outputs = [s.responses[0] for s in samples]
        generator = f"spa_iter_{t}"
        columns = {
            "instruction": prompts, "output": outputs, "generator": [generator] * len(prompts),
            "num_tokens": pa.array([s.num_tokens[0] for s in samples], pa.int32()),
            "finish_reason": [s.finish_reasons[0] for s in samples],
        }
        summary = {"iteration": t, "n": len(prompts), "win_rate": None, "lc_win_rate": None, "lc_model": None,
                   "annotator": None}
        if reference is not None:
            if reference["instruction"] != prompts:  # never score a misaligned set (alpaca_eval#453)
                raise ValueError("model outputs and reference outputs are not aligned instruction by instruction")
            columns["reference_output"] = reference["output"]
            if ec.annotator:
                prefs = annotate(load_annotator(ec.annotator), prompts, reference["output"], outputs)
                columns["preference"] = prefs
                rates = win_rate(prefs)
                summary.update(win_rate=rates["win_rate"], standard_error=rates["standard_error"],
                               n_wins=rates["n_wins"], n_draws=rates["n_draws"], annotator=ec.annotator)
            else:
                echo(f"[evaluate/{t}] no annotator configured (evaluate.annotator): outputs written, no win rate")
        write_table(pa.table(columns), layout.eval_table(t), "eval")
        write_text_atomic(layout.iteration(t) / "model_outputs.json", json.dumps(
            [{"instruction": i, "output": o, "generator": generator} for i, o in zip(prompts, outputs, strict=True)],
            indent=1))
        lengths = [s.num_tokens[0] for s in samples]
        summary.update({
            "avg_length": float(np.mean(lengths)) if lengths else None,
            "truncated_share": float(np.mean([s.finish_reasons[0] == "length" for s in samples])) if samples else None,
            "gold_agreement": agreement, "gold_pairs": heldout.num_rows,
        })
        write_text_atomic(layout.eval_summary(t), json.dumps(summary, indent=2))
        return {k: summary[k] for k in ("n", "avg_length", "gold_agreement", "win_rate")}

    inputs = [heldout_path, model, Path(cfg.model.pi_init)]
    if cfg.evaluate.reference_outputs:
        inputs.append(require(Path(cfg.evaluate.reference_outputs), "evaluate.reference_outputs", "the data preparation"))
    return run_stage(cfg, f"evaluate/{t}", inputs, SECTIONS, outputs, body,
                     extra_key={"iteration": t}, force=force, echo=echo)
