"""Scoring model outputs against an evaluation set: win rate and LC win rate (AlpacaEval 2.0).

The pieces the evaluate stage chains, usable on any outputs (``model_outputs.json`` of another
pipeline included): alignment check, annotation, and metrics through alpaca-eval's code.
A number is never reported on a partial or misaligned set: a missing annotation leaves the
win rate out, with the reason in ``win_rate_note``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spa.errors import MisalignedOutputs
from spa.evaluation.annotators import (
    AnnotatorUnavailable,
    Endpoint,
    annotate,
    annotate_alpaca_eval,
    check_available,
    load_annotator,
    win_rate,
)
from spa.evaluation.eval_sets import ALPACA_EVAL, EvalSet
from spa.evaluation.length_control import lc_win_rate


def check_aligned(instructions: Sequence[str], eval_set: EvalSet) -> None:
    """Refuse outputs that are not exactly the evaluation set's instructions, in its order (alpaca_eval#453)."""
    if len(instructions) != len(eval_set):
        raise MisalignedOutputs(f"{len(instructions)} model outputs for {len(eval_set)} instructions of "
                                f"{eval_set.name!r}: a win rate on a partial set is not reported")
    for k, (a, b) in enumerate(zip(instructions, eval_set.instructions, strict=True)):
        if a != b:
            raise MisalignedOutputs(f"model output {k} answers {a[:60]!r}, but instruction {k} of {eval_set.name!r} "
                                    f"is {b[:60]!r}: outputs and reference outputs are misaligned")


def score_outputs(instructions: Sequence[str], outputs: Sequence[str], generator: str, eval_set: EvalSet,
                  annotator: str | None, endpoint: Endpoint | None = None, seed: int = 0,
                  echo=print) -> tuple[list[float | None] | None, dict[str, Any]]:
    """Preferences (``None`` without an annotator) and the eval.json metrics for one model."""
    check_aligned(instructions, eval_set)
    summary: dict[str, Any] = {"eval_set": eval_set.name, "reference_generator": eval_set.reference_generator,
                               "annotator": annotator, "win_rate": None, "standard_error": None,
                               "lc_win_rate": None, "lc_standard_error": None, "lc_model": None}
    if not annotator:
        summary["win_rate_note"] = "no annotator configured (evaluate.annotator): outputs written, no win rate"
        echo(f"[evaluate] {summary['win_rate_note']}")
        return None, summary
    try:
        check_available(annotator, endpoint)
    except AnnotatorUnavailable as exc:
        summary["win_rate_note"] = f"annotator unavailable: {exc}; outputs written, no win rate"
        echo(f"[evaluate] {summary['win_rate_note']}")
        return None, summary
    if annotator.startswith("python:"):
        prefs: list[float | None] = list(annotate(load_annotator(annotator), instructions, eval_set.reference_outputs,
                                                  outputs))
    else:
        prefs = annotate_alpaca_eval(annotator.split(":", 1)[1], instructions, eval_set.reference_outputs, outputs,
                                     eval_set.reference_generator, generator, endpoint=endpoint, seed=seed)
    failed = [k for k, p in enumerate(prefs) if p is None]
    if failed:
        summary["annotation_failures"] = len(failed)
        summary["win_rate_note"] = (f"the annotator gave no preference for {len(failed)} of {len(prefs)} outputs "
                                    f"(first: row {failed[0]}); no win rate on a partial set")
        echo(f"[evaluate] {summary['win_rate_note']}")
        return prefs, summary
    complete = [float(p) for p in prefs if p is not None]
    rates = win_rate(complete)
    summary.update(win_rate=rates["win_rate"], standard_error=rates["standard_error"], n_wins=rates["n_wins"],
                   n_draws=rates["n_draws"], discrete_win_rate=rates.get("discrete_win_rate"))
    summary.update(lc_win_rate(instructions, eval_set.reference_outputs, outputs, complete, annotator, generator,
                               eval_set.reference_generator, alpaca_eval_set=eval_set.name == ALPACA_EVAL))
    return prefs, summary
