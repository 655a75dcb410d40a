"""The closing table ``spa run`` and ``spa demo`` print: one row per iteration, from the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spa.config import SPAConfig
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, Stage

COLUMNS = ("iteration", "win rate", "LC win rate", "gold agreement", "self-label acc.", "time")


def iteration_rows(layout: RunLayout, planned: int = 0) -> list[dict[str, Any]]:
    """Per iteration present in the run (0..``planned``, and any added later by ``spa expand``): win rate, LC win
    rate, gold agreement and mean length (``eval.json``), self-label accuracy (``judge_summary.json``, where an
    oracle or gold labels were known), the stages' wall time (the manifest), and ``evaluated``: whether
    ``eval.json`` exists. The closing table and the Prefect metrics artifact are both built from these rows."""
    stages = Manifest(layout.manifest).entries() if layout.manifest.exists() else {}
    rows, last = [], planned
    while layout.iteration(last + 1).exists():  # iterations added by `spa expand`
        last += 1
    for t in range(last + 1):
        if not layout.iteration(t).exists():
            continue
        keys = [Stage.PREPARE.key(), Stage.UNPAIRED.key(), Stage.SEED.key()] if t == 0 else [
            Stage.SAMPLE.key(t), Stage.JUDGE.key(t), Stage.TRAIN.key(t)]
        keys.append(Stage.EVALUATE.key(t))
        ev = _json(layout.eval_summary(t))
        judge = _json(layout.judge_summary(t)) if t else {}
        times = [stages[k]["wall_time_s"] for k in keys if "wall_time_s" in stages.get(k, {})]
        rows.append({"iteration": t, "win_rate": ev.get("win_rate"), "lc_win_rate": ev.get("lc_win_rate"),
                     "gold_agreement": ev.get("gold_agreement"), "avg_length": ev.get("avg_length"),
                     "self_label_accuracy": judge.get("self_label_accuracy"),
                     "time_s": sum(times) if times else None, "evaluated": bool(ev),
                     "instruction_following": instruction_columns(ev)})
    return rows


def instruction_columns(ev: dict[str, Any]) -> dict[str, float | None]:
    """IFEval's prompt-level accuracies of each instruction-following set in ``eval.json``, in percent, by column
    name (``<set> prompt loose``, ``<set> prompt strict``)."""
    out = {}
    for name, got in (ev.get("instruction_following") or {}).items():
        for key in ("prompt_loose", "prompt_strict"):
            out[f"{name} {key.replace('_', ' ')}"] = None if got.get(key) is None else 100 * got[key]
    return out


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{value:.1f}"
    if kind == "frac":
        return f"{value:.3f}"
    return f"{value:.0f}s" if value >= 10 else f"{value:.1f}s"


def closing_table(cfg: SPAConfig) -> str:
    """The iterations as an aligned text table (win rates and instruction-following accuracies in percent; ``-``
    where not known). Instruction-following sets add their prompt-level loose accuracy before the time column."""
    kinds = (None, "pct", "pct", "frac", "frac", "time")
    keys = ("iteration", "win_rate", "lc_win_rate", "gold_agreement", "self_label_accuracy", "time_s")
    rows = iteration_rows(RunLayout.of(cfg), cfg.iterations)
    sets = list(dict.fromkeys(k for r in rows for k in r["instruction_following"] if k.endswith("prompt loose")))
    columns = COLUMNS[:-1] + tuple(sets) + COLUMNS[-1:]
    body = [[str(r["iteration"])] + [_cell(r[k], kind) for k, kind in zip(keys[1:-1], kinds[1:-1], strict=True)]
            + [_cell(r["instruction_following"].get(k), "pct") for k in sets] + [_cell(r["time_s"], "time")]
            for r in rows]
    widths = [max(len(c) for c in col) for col in zip(columns, *body, strict=True)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in body])
