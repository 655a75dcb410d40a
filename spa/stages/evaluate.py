"""``spa evaluate --iteration t``: AlpacaEval-style win rates, gold agreement, lengths, MT-Bench.

- Outputs for the evaluation set (default: the 805 AlpacaEval 2.0 instructions) in alpaca-eval's
  ``model_outputs.json`` format and as ``eval.parquet``; annotated against the reference outputs
  by the configured annotator; win rate and length-controlled win rate by alpaca-eval's code
  (``spa.evaluation.scoring``).
- Gold agreement: the share of held-out gold pairs where ``pi_t``'s implicit reward against
  ``pi_init`` (Eq. 4) prefers the gold ``chosen``.
- MT-Bench (optional): two-turn answers and single-answer grades (``spa.evaluation.mt_bench``).
"""

from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from spa.config import SPAConfig
from spa.errors import EvalSetError
from spa.evaluation.instruction_sets import IFEVAL, load_instruction_set, set_name
from spa.run.artifacts import read_table, write_table, write_text_atomic
from spa.run.layout import RunLayout, model_dir
from spa.run.manifest import Stage
from spa.run.model_card import write_model_card
from spa.run.stage_runner import StageResult, require, run_stage

if TYPE_CHECKING:  # imported at call time: torch and the samplers stay out of the import of this stage
    from spa.models.sampling import SamplingSpec

SECTIONS = ["model", "evaluate", "judge"]
NAMED_SETS = ("alpaca_eval", "heldout", "none")


def gold_agreement(cfg: SPAConfig, t: int, heldout: pa.Table) -> float:
    """Share of gold pairs with ``r_t(chosen) > r_t(rejected)``, ``r`` against ``pi_init``."""
    import torch

    from spa.judges.implicit_reward import implicit_reward
    from spa.models.loading import load_causal_lm
    from spa.models.logprobs import sequence_logps
    from spa.models.rendering import load_tokenizer

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


def _endpoint(cfg: SPAConfig):
    from spa.evaluation.annotators import Endpoint

    ep = cfg.evaluate.judge_endpoint
    return Endpoint(ep.base_url, ep.model, ep.api_key_env) if ep is not None else None


def _eval_set(cfg: SPAConfig, heldout: pa.Table):
    """The instructions to answer and the reference set (``None`` for the held-out prompts)."""
    from spa.evaluation.eval_sets import HELDOUT, NO_EVAL_SET, load_eval_set

    n = cfg.evaluate.max_prompts
    if cfg.evaluate.eval_set == NO_EVAL_SET:
        return [], None
    if cfg.evaluate.eval_set == HELDOUT:
        return heldout.column("prompt").to_pylist()[:n], None
    eval_set = load_eval_set(cfg.evaluate.eval_set)
    if n is not None and n < len(eval_set):  # the first n, with their own reference outputs
        eval_set = dataclasses.replace(eval_set, instructions=eval_set.instructions[:n],
                                       reference_outputs=eval_set.reference_outputs[:n], full_size=len(eval_set))
    return list(eval_set.instructions), eval_set


def _mt_bench(cfg: SPAConfig, t: int, sampler, layout: RunLayout, echo) -> dict[str, Any]:
    """Two-turn answers to the MT-Bench questions and, with a judge, their 1-10 grades."""
    from spa.errors import AnnotatorUnavailable
    from spa.evaluation.eval_sets import load_mt_bench
    from spa.evaluation.mt_bench import make_judge

    mc = cfg.evaluate.mt_bench
    questions = load_mt_bench(mc.questions)
    first = sampler([q.turns[0] for q in questions], progress=f"MT-Bench turn 1, iter {t}", max_new_tokens=mc.max_new_tokens)
    a1 = [s.responses[0] for s in first]
    convs = [[{"role": "user", "content": q.turns[0]}, {"role": "assistant", "content": a},
              {"role": "user", "content": q.turns[1]}] for q, a in zip(questions, a1, strict=True)]
    second = sampler(convs, progress=f"MT-Bench turn 2, iter {t}", max_new_tokens=mc.max_new_tokens)
    a2 = [s.responses[0] for s in second]
    cols: dict[str, Any] = {
        "question_id": pa.array([q.question_id for q in questions], pa.int32()),
        "category": [q.category for q in questions], "turn_1": a1, "turn_2": a2,
    }
    out: dict[str, Any] = {"questions": len(questions), "judge": mc.judge, "score": None,
                           "temperature": cfg.evaluate.temperature,
                           "note": "one temperature for every category (FastChat uses per-category ones)"}
    judge = None
    if mc.judge is None:
        out["note"] = "no MT-Bench judge configured (evaluate.mt_bench.judge): answers written, grading skipped"
    else:
        try:
            judge = make_judge(mc.judge, _endpoint(cfg))
        except AnnotatorUnavailable as exc:
            out["note"] = f"MT-Bench judge unavailable: {exc}; answers written, grading skipped"
    if judge is None:
        echo(f"[evaluate/{t}] {out['note']}")
    else:
        grades = {1: [], 2: []}
        for q, x, y in zip(questions, a1, a2, strict=True):
            for turn in (1, 2):
                grades[turn].append(judge(q, turn, [x, y]))
        for turn in (1, 2):
            cols[f"score_{turn}"] = pa.array([g.score for g in grades[turn]], pa.float64())
            cols[f"judgment_{turn}"] = [g.judgment for g in grades[turn]]
        scores = {turn: [g.score for g in grades[turn] if g.score is not None] for turn in (1, 2)}
        missing = sum(g.score is None for turn in (1, 2) for g in grades[turn])
        out.update(turn_1=float(np.mean(scores[1])) if scores[1] else None,
                   turn_2=float(np.mean(scores[2])) if scores[2] else None, unparsed=missing)
        if missing:  # FastChat drops unparsable ratings; we report the count and no average on a partial set
            out["note"] = f"{missing} judgments had no [[rating]]: no MT-Bench score on a partial set"
        else:
            out["score"] = float(np.mean(scores[1] + scores[2]))
    write_table(pa.table(cols), layout.mt_bench(t))
    return out


def eval_sampling_spec(cfg: SPAConfig) -> SamplingSpec:
    """How the evaluation answers are sampled: one answer a prompt, the sampling stage's settings with the
    evaluate section's temperature, length, batch size and (where set) top_p."""
    from spa.models.sampling import SamplingSpec

    ec = cfg.evaluate
    top_p = {} if ec.top_p is None else {"top_p": ec.top_p}
    return SamplingSpec.from_config(cfg.sample, cfg.model, n=1, temperature=ec.temperature,
                                    max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, **top_p)


def eval_sampler(cfg: SPAConfig, t: int, model: Path, spec: SamplingSpec, echo):
    """The sampler that answers for evaluation: in ``sample.python``'s environment where one is set (the vLLM
    environment), else here (vLLM where importable, else transformers)."""
    from spa.models.remote_sampling import same_interpreter, sampler_for
    from spa.models.sampling import vllm_available

    backend = cfg.sample.backend
    if backend == "vllm" and same_interpreter(cfg.sample.python) and not vllm_available():
        echo(f"[evaluate/{t}] vLLM is not importable here; answering with the transformers backend")
        backend = "transformers"
    return sampler_for(cfg.sample.python, backend, model, spec)


def _answer(cfg: SPAConfig, t: int, model: Path, prompts: list[str], echo):
    """pi_t's answers to the evaluation prompts and its sampler (none when nothing needs one)."""
    if not prompts and not cfg.evaluate.mt_bench.enabled:
        return [], None
    sampler = eval_sampler(cfg, t, model, eval_sampling_spec(cfg), echo)
    return (sampler(prompts, progress=f"evaluate iter {t}") if prompts else []), sampler


def instruction_following(cfg: SPAConfig, t: int, model: Path, sets: list, echo) -> dict[str, dict[str, Any]]:
    """pi_t's greedy answers to each instruction-following set (one sampler call for all of them), scored by
    IFEval's checkers; each set's answers and verdicts go to ``iter_t/instructions_<name>.parquet``."""
    from spa.evaluation.instruction_sets import score_answers

    if not sets:
        return {}
    layout = RunLayout.of(cfg)
    greedy = dataclasses.replace(eval_sampling_spec(cfg), temperature=0.0, top_p=1.0)
    samples = eval_sampler(cfg, t, model, greedy, echo)([task.prompt for s in sets for task in s.tasks],
                                                        progress=f"instruction sets iter {t}")
    out, start = {}, 0
    for iset in sets:
        part, start = samples[start : start + len(iset)], start + len(iset)
        answers = [s.responses[0] for s in part]
        verdicts, summary = score_answers(iset, answers)
        lengths = [s.num_tokens[0] for s in part]
        write_table(pa.table({
            "prompt": [task.prompt for task in iset.tasks], "output": answers,
            "instruction_id_list": [list(task.instruction_ids) for task in iset.tasks],
            "strict": [list(v.strict) for v in verdicts], "loose": [list(v.loose) for v in verdicts],
            "num_tokens": pa.array(lengths, pa.int32()), "finish_reason": [s.finish_reasons[0] for s in part],
        }), layout.instruction_answers(t, iset.name))
        out[iset.name] = summary | {"avg_length": float(np.mean(lengths)),
                                    "truncated_share": float(np.mean([s.finish_reasons[0] == "length" for s in part]))}
        echo(f"[evaluate/{t}] {iset.name}: prompt-level loose {summary['prompt_loose']:.3f}, strict "
             f"{summary['prompt_strict']:.3f} (n={summary['n']}, {summary['skipped']} not checkable here)")
    return out


def _score(cfg: SPAConfig, t: int, prompts, outputs, generator: str, eval_set, columns: dict, echo) -> dict:
    """Win rate and LC win rate against the eval set's reference outputs (adds the preference column)."""
    from spa.evaluation.scoring import score_outputs

    if eval_set is None:
        name = cfg.evaluate.eval_set
        return dict(eval_set=name, annotator=None, win_rate=None, lc_win_rate=None, lc_model=None,
                    win_rate_note=f"eval_set '{name}' has no reference outputs: " + (
                        "lengths only" if name == "heldout" else "no answers, no win rate"))
    columns["reference_output"] = eval_set.reference_outputs
    subset = {"eval_set_size": eval_set.full_size} if eval_set.full_size else {}
    prefs, scored = score_outputs(prompts, outputs, generator, eval_set, cfg.evaluate.annotator, _endpoint(cfg),
                                  seed=cfg.sample.seed, echo=lambda m: echo(m.replace("[evaluate]", f"[evaluate/{t}]")))
    if prefs is not None:
        columns["preference"] = pa.array(prefs, pa.float64())
    return scored | subset


def evaluate_model(cfg: SPAConfig, t: int, model: Path, heldout_path: Path, echo=print) -> dict[str, Any]:
    """Answer the eval set with pi_t, score the answers, measure gold agreement; write ``iter_t/eval.*``."""
    layout = RunLayout.of(cfg)
    heldout = read_table(heldout_path, "heldout")
    prompts, eval_set = _eval_set(cfg, heldout)  # before any model work: a bad eval set fails fast
    instruction_sets = [load_instruction_set(spec) for spec in cfg.evaluate.instruction_sets]
    agreement = gold_agreement(cfg, t, heldout)
    samples, sampler = _answer(cfg, t, model, prompts, echo)
    outputs = [s.responses[0] for s in samples]
    generator = f"spa_iter_{t}"
    columns: dict[str, Any] = {
        "instruction": pa.array(prompts, pa.string()), "output": pa.array(outputs, pa.string()),
        "generator": pa.array([generator] * len(prompts), pa.string()),
        "num_tokens": pa.array([s.num_tokens[0] for s in samples], pa.int32()),
        "finish_reason": pa.array([s.finish_reasons[0] for s in samples], pa.string()),
    }
    # the outputs are written first: an annotator failure never loses them
    write_text_atomic(layout.model_outputs(t), json.dumps(
        [{"instruction": i, "output": o, "generator": generator} for i, o in zip(prompts, outputs, strict=True)],
        indent=1))
    summary: dict[str, Any] = {"iteration": t, "n": len(prompts), "generator": generator}
    summary.update(_score(cfg, t, prompts, outputs, generator, eval_set, columns, echo))
    write_table(pa.table(columns), layout.eval_table(t), "eval")
    if cfg.evaluate.mt_bench.enabled:
        summary["mt_bench"] = _mt_bench(cfg, t, sampler, layout, echo)
    if instruction_sets:
        summary["instruction_following"] = instruction_following(cfg, t, model, instruction_sets, echo)
    lengths = [s.num_tokens[0] for s in samples]
    summary.update({
        "avg_length": float(np.mean(lengths)) if lengths else None,
        "avg_length_chars": float(np.mean([len(o) for o in outputs])) if outputs else None,
        "truncated_share": float(np.mean([s.finish_reasons[0] == "length" for s in samples])) if samples else None,
        "gold_agreement": agreement, "gold_pairs": heldout.num_rows,
    })
    write_text_atomic(layout.eval_summary(t), json.dumps(summary, indent=2))
    if cfg.train.report_to:  # the same numbers into iteration t's experiment-tracker run
        from spa.run.trackers import log_summary

        log_summary(cfg.train.report_to, cfg.run_dir, t, "eval", summary, echo)
    headline = {f"{name}_{k}": v[k] for name, v in summary.get("instruction_following", {}).items()
                for k in ("prompt_loose", "prompt_strict")}
    return {k: summary.get(k) for k in ("n", "avg_length", "gold_agreement", "win_rate", "lc_win_rate")} | headline


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print) -> StageResult:
    """Evaluate pi_t (``t = 0``: pi_0) unless the manifest says this exact evaluation is done."""
    layout = RunLayout.of(cfg)
    es = cfg.evaluate.eval_set
    if es not in NAMED_SETS and not Path(es).exists():  # a config value: no stage writes it
        looked = "" if Path(es).is_absolute() else f" (looked for {Path(es).resolve()})"
        raise EvalSetError(f"evaluate.eval_set: {es} does not exist{looked}; give a JSON, JSONL or Parquet file of "
                           "(instruction, output) rows, 'alpaca_eval', 'heldout' or 'none'")
    heldout_path = require(layout.heldout, "the held-out gold set", "spa prepare")
    model = require(model_dir(cfg, t), f"pi_{t}", "spa seed" if t == 0 else f"spa train --iteration {t}")
    outputs = [layout.eval_table(t), layout.eval_summary(t), layout.model_outputs(t)]
    if cfg.evaluate.mt_bench.enabled:
        outputs.append(layout.mt_bench(t))
    outputs += [layout.instruction_answers(t, set_name(spec)) for spec in cfg.evaluate.instruction_sets]
    inputs = [heldout_path, model, Path(cfg.model.pi_init)] + ([] if es in NAMED_SETS else [Path(es)])
    inputs += [Path(spec) for spec in cfg.evaluate.instruction_sets if spec != IFEVAL]
    result = run_stage(cfg, Stage.EVALUATE.key(t), inputs, SECTIONS, outputs,
                       partial(evaluate_model, cfg, t, model, heldout_path, echo),
                       extra_key={"iteration": t}, force=force, echo=echo)
    write_model_card(cfg, t)  # the card of pi_t, now with this evaluation's numbers
    return result
