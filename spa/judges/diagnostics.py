"""What a round's labels and refinement flags are worth: the numbers behind the judge and train summaries.

Pure functions over arrays (no I/O, no torch), so each is tested against hand-counted values.
None of them is part of SPA itself; they answer the questions a user asks of a run:
is the judge right (against an oracle, where one exists), does it simply prefer short
answers, and do the refinement flags (Eq. 9 with SR or DND confidences) land on the wrong
labels more often than chance?

An oracle verdict is alpaca-eval's preference encoding for the pair (chosen, rejected):
1 the oracle agrees with the label, 2 it prefers the rejected answer, 1.5 no preference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _rate(hits: np.ndarray, among: np.ndarray) -> float | None:
    return float(np.sum(hits & among) / np.sum(among)) if np.any(among) else None


def judge_length_preference(chosen_tokens: Sequence[int], rejected_tokens: Sequence[int]) -> dict[str, float | None]:
    """The judge's shorter-wins rate: of the pairs of unequal length, the share whose chosen answer is shorter.

    0.5 is length-neutral; a judge near 1.0 is a length detector."""
    c, r = np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    unequal = c != r
    return {"judge_shorter_wins": _rate(c < r, unequal), "unequal_length_pairs": int(np.sum(unequal))}


def oracle_label_quality(verdicts: Sequence[float], chosen_tokens: Sequence[int],
                         rejected_tokens: Sequence[int]) -> dict[str, float | int | None]:
    """Self-label accuracy, the noise rate, and the oracle's own shorter-wins rate.

    ``verdicts``: the oracle's preference per labelled pair (1 agrees, 2 disagrees, 1.5 undecided).
    Accuracy and noise rate count only the pairs the oracle decides; the oracle's shorter-wins rate
    counts the decided pairs of unequal length (compare it with :func:`judge_length_preference`)."""
    v, c, r = np.asarray(verdicts, dtype=float), np.asarray(chosen_tokens), np.asarray(rejected_tokens)
    decided = v != 1.5
    right = v == 1.0
    shorter_is_oracles = np.where(right, c < r, r < c)
    accuracy = _rate(right, decided)
    return {
        "self_label_accuracy": accuracy,
        "noise_rate": None if accuracy is None else 1.0 - accuracy,
        "oracle_decided_pairs": int(np.sum(decided)),
        "oracle_shorter_wins": _rate(shorter_is_oracles, decided & (c != r)),
    }


def flag_precision(flags: Sequence[bool], bad: Sequence[bool]) -> dict[str, float | None]:
    """Precision and recall of refinement flags on the bad labels, with the bad labels' base rate.

    Flags that find bad labels no better than chance have precision equal to the base rate; the
    ratio (``lift``) says how many times better than chance they are."""
    f, b = np.asarray(flags, dtype=bool), np.asarray(bad, dtype=bool)
    base = float(np.mean(b)) if len(b) else None
    precision = _rate(b, f)
    return {"precision": precision, "recall": _rate(f, b), "base_rate": base,
            "lift": precision / base if precision is not None and base else None}


def refinement_diagnostics(steps: Sequence[int], z_sr: Sequence[bool], z_dnd: Sequence[bool] | None,
                           warmup_fraction: float, flipped: Sequence[bool] | None = None,
                           wrong: Sequence[bool | None] | None = None) -> dict[str, float | int | None]:
    """Flag statistics of one training round after the denoising warm-up (Eq. 9).

    ``steps``: the optimiser step of each training sample (0-based); samples before
    ``warmup_fraction`` of the steps are left out, as no flag can be raised there. ``z_dnd`` is None
    when DND is off. ``flipped``: injected label flips (judge.flip_fraction); ``wrong``: the oracle
    says the label is wrong (None where it has no preference; such samples are left out of those
    numbers). Returns the flagged shares, how often SR and DND disagree, and each detector's
    precision against the flip rate and against the oracle's noise rate."""
    s = np.asarray(steps)
    total = int(s.max()) + 1 if len(s) else 0
    active = s >= warmup_fraction * total
    detectors = {"sr": np.asarray(z_sr, dtype=bool)[active]}
    if z_dnd is not None:
        detectors["dnd"] = np.asarray(z_dnd, dtype=bool)[active]
    out: dict[str, float | int | None] = {"flag_samples": int(np.sum(active))}
    for name, z in detectors.items():
        out[f"{name}_flagged_share"] = float(np.mean(z)) if len(z) else None
    if "dnd" in detectors:
        out["sr_dnd_disagreement"] = float(np.mean(detectors["sr"] != detectors["dnd"])) if np.any(active) else None
    if flipped is not None and np.any(np.asarray(flipped, dtype=bool)):
        fl = np.asarray(flipped, dtype=bool)[active]
        out["flip_rate"] = float(np.mean(fl)) if len(fl) else None
        for name, z in detectors.items():
            out[f"{name}_flip_precision"] = flag_precision(z, fl)["precision"]
    if wrong is not None:
        w = np.asarray([x if x is not None else np.nan for x in wrong], dtype=float)[active]
        known = ~np.isnan(w)
        bad = w[known] == 1.0
        out["noise_rate"] = float(np.mean(bad)) if len(bad) else None
        for name, z in detectors.items():
            stats = flag_precision(z[known], bad)
            out[f"{name}_precision"], out[f"{name}_recall"] = stats["precision"], stats["recall"]
    return out
