"""Length-controlled win rate (AlpacaEval 2.0, Dubois et al. 2024) through alpaca-eval's own GLM code.

alpaca-eval's default GLM (``length_controlled_v1``) needs ``df_gamed.csv`` from the Hugging Face
hub (per-instruction difficulty of the 805 AlpacaEval instructions and the annotations of two
"gamed" baselines used to regularise the fit); its instruction-difficulty term only means
something on that set. So:

- on the AlpacaEval set, with the hub reachable: ``length_controlled_v1``, alpaca-eval's number;
- otherwise (offline, or a custom instruction set): ``length_controlled_minimal_offline``: the
  ``length_controlled_minimal`` formula of alpaca-eval (``tanh(std_delta_len)`` + intercept), fitted
  with alpaca-eval's ``make_dmatrix_for_model`` and ``fit_LogisticRegressionCV``, no hub file.
  It is written by hand only because alpaca-eval's featurisation downloads the hub file even for
  that formula.

Which one ran is returned as ``lc_model`` and recorded in ``eval.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

log = logging.getLogger(__name__)
# liblinear's C code (sklearn) prints this with fprintf(stderr) on every cross-validation fold in which a
# label has only zero-weight rows: alpaca-eval's fit duplicates each row as label 1 (weight p) and label 0
# (weight 1 - p), so a fold whose preferences are all 1.0 has no label-0 weight. Harmless for the fit.
LIBLINEAR_NOISE = re.compile(r"^(WARNING|warning): class label \d+ specified in weight is not found$")

V1 = "length_controlled_v1"
OFFLINE = "length_controlled_minimal_offline"
MIN_ROWS = 10  # fewer rows than this cannot support a 5-fold cross-validated fit


@contextlib.contextmanager
def liblinear_notes_to_log() -> Iterator[None]:
    """Catch C-level stderr (fd 2) around a fit: :data:`LIBLINEAR_NOISE` lines become one log record, any
    other line is written back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
            noise = [line for line in lines if LIBLINEAR_NOISE.match(line.strip())]
            if noise:
                log.info("liblinear (length-control fit): %d x %r", len(noise), noise[0].strip())
            for line in lines:
                if not LIBLINEAR_NOISE.match(line.strip()):
                    sys.stderr.write(line + "\n")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def lc_win_rate(instructions: Sequence[str], reference: Sequence[str], outputs: Sequence[str],
                preferences: Sequence[float], annotator: str, generator: str, reference_generator: str,
                alpaca_eval_set: bool) -> dict[str, Any]:
    """``{"lc_win_rate", "lc_standard_error", "lc_model", "lc_note"}`` for one model against the reference.

    ``preferences`` follow alpaca-eval (1: reference wins, 2: model wins, 1.5 or 0: draw). The
    length feature is the character-length difference, as in alpaca-eval.
    """
    import pandas as pd

    n = len(preferences)
    if n < MIN_ROWS:
        return {"lc_win_rate": None, "lc_standard_error": None, "lc_model": None,
                "lc_note": f"{n} annotated rows: too few for the length-control fit (needs {MIN_ROWS})"}
    df = pd.DataFrame({
        "instruction": list(instructions), "output_1": list(reference), "output_2": list(outputs),
        "preference": [float(p) for p in preferences], "annotator": annotator,
        "generator_1": reference_generator, "generator_2": generator,
    })
    df["index"] = range(n)
    note = None
    if alpaca_eval_set and not _hub_offline():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from alpaca_eval.metrics import get_length_controlled_winrate
            with liblinear_notes_to_log():
                out = get_length_controlled_winrate(df, save_weights_dir=None, is_warn_extreme_changes=False)
            return {"lc_win_rate": float(out["length_controlled_winrate"]),
                    "lc_standard_error": float(out["lc_standard_error"]), "lc_model": V1, "lc_note": None}
        except Exception as exc:  # the hub file could not be fetched: fall back, and say why
            note = f"{V1} unavailable ({type(exc).__name__}); used {OFFLINE}"
    elif alpaca_eval_set:
        note = f"HF_HUB_OFFLINE is set: {V1} needs df_gamed.csv from the hub; used {OFFLINE}"
    else:
        note = f"custom instruction set: {V1}'s instruction difficulty is defined on AlpacaEval only; used {OFFLINE}"
    rate = _offline_lc(df)
    # the minimal GLM predicts one probability for every row at equal length: no per-row spread, no standard error
    return {"lc_win_rate": rate, "lc_standard_error": None, "lc_model": OFFLINE, "lc_note": note}


def _offline_lc(df) -> float:
    """alpaca-eval's GLM with the ``length_controlled_minimal`` formula, featurised without the hub."""
    import numpy as np
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    info = GLM_INFO["length_controlled_minimal"]
    delta = df["output_1"].str.len() - df["output_2"].str.len()
    std = float(delta.std())
    feats = pd.DataFrame({
        # as alpaca-eval: preference in [0, 1] (1: the model wins), draws (0 or 1.5) at 0.5
        "preference": df["preference"].astype(float).replace({0.0: 1.5}) - 1,
        "std_delta_len": delta / std if std > 0 else delta * 0.0,
        "not_gamed_baseline": True,
    })
    test = feats[["not_gamed_baseline"]].copy()
    test["std_delta_len"] = 0.0
    train, x_test = make_dmatrix_for_model(feats, test, formula=info["formula"])
    with warnings.catch_warnings(), liblinear_notes_to_log():
        warnings.simplefilter("ignore")
        model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, **info["kwargs"])
    predicted = model.predict_proba(x_test)[:, 1]
    return float(np.mean(predicted) * 100)
