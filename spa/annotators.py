"""Pairwise annotators for evaluation, and win rates through alpaca-eval's own code.

An annotator compares a reference output (``output_1``) with the model's (``output_2``)
for an instruction and returns alpaca-eval's preference: 1 (reference wins), 2 (model
wins), 1.5 (tie). ``python:module:function`` names such a function (the demo world's
oracle, or a user's own).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

Annotator = Callable[[str, str, str], float]


class AnnotatorError(ValueError):
    """The annotator is unknown, unloadable, or answered outside {1, 1.5, 2}."""


def load_annotator(spec: str) -> Annotator:
    """Resolve ``python:module:function`` to the function."""
    kind, _, target = spec.partition(":")
    if kind != "python" or ":" not in target:
        raise AnnotatorError(f"annotator {spec!r}: expected 'python:module:function'")
    module, _, name = target.rpartition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise AnnotatorError(f"annotator {spec!r}: cannot import ({exc})") from exc
    if not callable(fn):
        raise AnnotatorError(f"annotator {spec!r} is not callable")
    return fn


def annotate(fn: Annotator, instructions: Sequence[str], reference: Sequence[str], outputs: Sequence[str]) -> list[float]:
    prefs = [float(fn(i, r, o)) for i, r, o in zip(instructions, reference, outputs, strict=True)]
    bad = [k for k, p in enumerate(prefs) if p not in (1.0, 1.5, 2.0)]
    if bad:
        raise AnnotatorError(f"annotator returned {prefs[bad[0]]} for row {bad[0]}; expected 1, 1.5 or 2")
    return prefs


def win_rate(preferences: Sequence[float]) -> dict[str, Any]:
    """alpaca-eval's ``get_winrate`` (percent), as plain Python numbers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alpaca-eval 0.6.6 imports pkg_resources
        from alpaca_eval.metrics import get_winrate
    out = get_winrate({"preference": list(preferences)})
    return {k: (float(v) if hasattr(v, "__float__") else v) for k, v in out.items()}
