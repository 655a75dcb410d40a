"""What the oracle says about a demo run, per iteration, and the report with plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from spa.artifacts import read_table, write_text_atomic
from spa.config import SPAConfig
from spa.demo.world import score
from spa.layout import RunLayout


def _pr(flags: list[bool], wrong: list[bool]) -> tuple[float | None, float | None]:
    hits = sum(f and w for f, w in zip(flags, wrong, strict=True))
    precision = hits / sum(flags) if any(flags) else None
    recall = hits / sum(wrong) if any(wrong) else None
    return precision, recall


def iteration_metrics(cfg: SPAConfig, t: int) -> dict[str, Any]:
    """Oracle win rate, self-label accuracy, noise-detection precision/recall, refined share, length."""
    lay = RunLayout(Path(cfg.run_dir))
    out: dict[str, Any] = {"iteration": t}
    ev = json.loads(lay.eval_summary(t).read_text()) if lay.eval_summary(t).exists() else {}
    out["win_rate"] = ev.get("win_rate")
    out["avg_length"] = ev.get("avg_length")
    out["gold_agreement"] = ev.get("gold_agreement")
    if lay.train_log(t).exists():
        fr = read_table(lay.train_log(t), "train_log").column("refined_fraction").to_pylist()
        out["refined_fraction"] = sum(fr) / len(fr) if fr else None
    if t == 0 or not lay.judgments(t).exists():
        return out
    judged = read_table(lay.judgments(t), "judgments").to_pylist()
    wrong_by_id, decided = {}, 0
    correct = 0
    for row in judged:
        if row["tie"]:
            continue
        sc, sr = score(row["prompt"], row["chosen"]), score(row["prompt"], row["rejected"])
        if sc == sr:
            continue  # the oracle has no preference: neither right nor wrong
        decided += 1
        correct += sc > sr
        wrong_by_id[row["prompt_id"]] = sc < sr
    out["self_label_accuracy"] = correct / decided if decided else None
    out["oracle_decided_pairs"] = decided
    refinement = lay.iteration(t) / "refinement.parquet"
    if refinement.exists():
        rows = [r for r in pq.read_table(refinement).to_pylist() if r["prompt_id"] in wrong_by_id]
        if rows:
            total = max(r["step"] for r in rows) + 1
            warm = math.ceil(cfg.train.refinement.warmup_fraction * total)
            active = [r for r in rows if r["step"] >= warm]
            wrong = [wrong_by_id[r["prompt_id"]] for r in active]
            out["sr_precision"], out["sr_recall"] = _pr([r["z_sr"] for r in active], wrong)
            if cfg.train.refinement.decoupled:
                out["dnd_precision"], out["dnd_recall"] = _pr([r["z_dnd"] for r in active], wrong)
            out["noise_rate"] = sum(wrong) / len(wrong) if wrong else None
    return out


def run_metrics(cfg: SPAConfig) -> list[dict[str, Any]]:
    lay = RunLayout(Path(cfg.run_dir))
    t, rows = 0, []
    while lay.iteration(t).exists():
        rows.append(iteration_metrics(cfg, t))
        t += 1
    return rows


PLOTS = [
    ("win_rate", "oracle win rate vs pi_init (%)"),
    ("self_label_accuracy", "self-label accuracy"),
    (("sr_precision", "dnd_precision"), "noise-detection precision"),
    (("sr_recall", "dnd_recall"), "noise-detection recall"),
    ("refined_fraction", "refined fraction"),
    ("avg_length", "response length (tokens)"),
]


def plot(rows: list[dict[str, Any]], target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (keys, title) in zip(axes.flat, PLOTS, strict=True):
        for key in (keys,) if isinstance(keys, str) else keys:
            pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key.split("_")[0].upper() if not isinstance(keys, str) else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_xticks([r["iteration"] for r in rows])
        if not isinstance(keys, str):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:.1f}" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


def demo_section(rows: list[dict[str, Any]], plot_name: str) -> str:
    lines = [
        "## Demo world (the oracle's view)", "",
        "Win rate: the oracle compares each model's answer with pi_init's on held-out evaluation prompts "
        "(alpaca-eval's `get_winrate`; 50% = no better than pi_init). Self-label accuracy: share of judged pairs "
        "whose label the oracle agrees with. Precision/recall: how well the refinement flags (SR: pi_theta's own "
        "margin; DND: the extrapolated model) find the mislabelled pairs, after the denoising warm-up.", "",
        "| iteration | win rate % | self-label acc. | noise rate | SR prec. | SR recall | DND prec. | DND recall "
        "| refined share | gold agreement | length |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["iteration"]), _fmt(r.get("win_rate"), pct=True), _fmt(r.get("self_label_accuracy")),
            _fmt(r.get("noise_rate")), _fmt(r.get("sr_precision")), _fmt(r.get("sr_recall")),
            _fmt(r.get("dnd_precision")), _fmt(r.get("dnd_recall")), _fmt(r.get("refined_fraction")),
            _fmt(r.get("gold_agreement")), _fmt(r.get("avg_length")),
        ]) + " |")
    lines += ["", f"![demo metrics]({plot_name})", ""]
    return "\n".join(lines)


def write_demo_report(cfg: SPAConfig) -> Path:
    """``report.md`` = the run report + the demo world's section and plot."""
    from spa.stages.report import build_report

    lay = RunLayout(Path(cfg.run_dir))
    rows = run_metrics(cfg)
    plot(rows, lay.root / "demo_metrics.png")
    write_text_atomic(lay.root / "demo_metrics.json", json.dumps(rows, indent=2))
    write_text_atomic(lay.report, build_report(cfg) + "\n" + demo_section(rows, "demo_metrics.png"))
    return lay.report
