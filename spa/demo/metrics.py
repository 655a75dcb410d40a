"""What the oracle says about a demo run, per iteration, and the report with plots."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spa.config import SPAConfig
from spa.demo.world import FEATURES, SCORED, features, score
from spa.run.artifacts import read_table, write_text_atomic
from spa.run.layout import RunLayout


def iteration_metrics(cfg: SPAConfig, t: int) -> dict[str, Any]:
    """Oracle win rate, the judge's label diagnostics, noise-detection precision/recall, refined share, length.

    The label diagnostics come from ``iter_t/judge_summary.json`` (the demo config sets ``judge.oracle``),
    the flag diagnostics from the round's ``refinement.parquet`` (:func:`spa.stages.train.refinement_summary`)."""
    from spa.stages.train import refinement_summary
    from spa.training.rounds import resolve_round

    lay = RunLayout.of(cfg)
    out: dict[str, Any] = {"iteration": t}
    ev = json.loads(lay.eval_summary(t).read_text()) if lay.eval_summary(t).exists() else {}
    for key in ("win_rate", "lc_win_rate", "avg_length", "gold_agreement"):
        out[key] = ev.get(key)
    if lay.train_log(t).exists():
        fr = read_table(lay.train_log(t), "train_log").column("refined_fraction").to_pylist()
        out["refined_fraction"] = sum(fr) / len(fr) if fr else None
    if t == 0:
        return out
    if lay.judge_summary(t).exists():
        judged = json.loads(lay.judge_summary(t).read_text())
        out |= {k: judged.get(k) for k in JUDGE_KEYS}
    rnd = resolve_round(cfg, t)
    if rnd.refines and lay.refinement(t).exists() and lay.judgments(t).exists():
        out |= refinement_summary(cfg, rnd)
    if lay.judgments(t).exists():
        out |= judge_by_feature(read_table(lay.judgments(t), "judgments").to_pylist())
    return out


def judge_by_feature(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """Where the judge is right and what the policy's samples look like, feature by feature.

    ``judge_feature_accuracy[f]``: of the labelled pairs whose two answers differ in feature ``f``, the
    share whose chosen answer is the better one in ``f`` (0.5 = the judge does not see ``f``; below 0.5 it
    prefers the worse); ``sample_features[f]``: the mean of ``f`` over all judged answers (the policy)."""
    labelled = [r for r in rows if not r["tie"]]
    pairs = [(features(r["prompt"], r["chosen"]), features(r["prompt"], r["rejected"])) for r in labelled]
    accuracy, differing = {}, {}
    for name in FEATURES:
        gaps = [c[name] - w[name] for c, w in pairs if c[name] != w[name]]
        differing[name] = len(gaps)
        accuracy[name] = sum(g > 0 for g in gaps) / len(gaps) if gaps else None
    answers = [f for pair in pairs for f in pair]
    means = {name: sum(f[name] for f in answers) / len(answers) if answers else None for name in FEATURES}
    return {"judge_feature_accuracy": accuracy, "feature_pairs": differing, "sample_features": means}


JUDGE_KEYS = ("self_label_accuracy", "noise_rate", "oracle_decided_pairs", "judge_shorter_wins",
              "oracle_shorter_wins", "mean_length", "length_penalty", "flipped")


def run_metrics(cfg: SPAConfig) -> list[dict[str, Any]]:
    lay = RunLayout.of(cfg)
    t, rows = 0, []
    while lay.iteration(t).exists():
        rows.append(iteration_metrics(cfg, t))
        t += 1
    return rows


def unpaired_diagnostics(cfg: SPAConfig, oracle: Callable[[str, str], float] = score) -> dict[str, Any]:
    """SSPO's seed stage against an oracle (the world's, or any ``oracle(prompt, response) -> score``, e.g. the
    verifier's): the last pseudo-label of each unpaired response (its last visit) against the oracle's verdict, a
    response being good when its oracle score is at least the median of the unpaired set's (docs/variants.md 7,
    decision 8); the share of good responses is what always saying "good" would score. Empty for a run without an
    unpaired set, and DPO+SFT gets the SFT term's last value only."""
    import torch

    from spa.training.sspo import pseudo_label_accuracy

    lay = RunLayout.of(cfg)
    if not lay.unpaired.exists():
        return {}
    import pyarrow.parquet as pq

    log = pq.read_table(lay.train_log(0)).to_pylist()
    out: dict[str, Any] = {"unpaired_loss_last": log[-1].get("unpaired_loss")}
    if not lay.pseudo_labels(0).exists():
        return out
    unpaired = pq.read_table(lay.unpaired).to_pylist()
    last: dict[int, bool] = {}
    for r in pq.read_table(lay.pseudo_labels(0), columns=["row", "step", "label"]).sort_by("step").to_pylist():
        last[r["row"]] = r["label"]
    rows = sorted(last)
    labels = torch.tensor([float(last[i]) for i in rows])
    scores = torch.tensor([oracle(unpaired[i]["prompt"], unpaired[i]["response"]) for i in rows])
    good = (scores >= torch.quantile(scores.double(), 0.5).float()).float()
    return out | {"pseudo_label_accuracy": pseudo_label_accuracy(labels, scores), "good_share": good.mean().item(),
                  "pseudo_positive_share": labels.mean().item(), "sspo_final_delta": log[-1]["sspo_delta"],
                  "sspo_final_g": log[-1]["sspo_g"]}


ARM_LABELS = {
    "sft": "SFT (pi_init)", "seed_dpo": "seed-only DPO (pi_0)", "iterative_dpo": "iterative DPO (no refinement)",
    "spa_sr": "SPA, SR only", "spa": "SPA (SR + DND)", "iterative_dpo_flip": "iterative DPO, flipped labels",
    "spa_flip": "SPA, flipped labels",
}


def _series(ax, rows, key, label=None, **style):
    pts = [(r["iteration"], r[key]) for r in rows if r.get(key) is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style)


def plot(rows: list[dict[str, Any]], target: Path, arms: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """Six panels: win rate (per arm), self-label accuracy, shorter-wins rates, flag precision against the
    noise base rate, flag precision on injected flips against the flip rate, length (per arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = arms or {"spa": rows}
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    (win, acc, short), (prec, flip, length) = axes
    for name, arm_rows in arms.items():
        if len(arm_rows) > 1:
            _series(win, arm_rows, "win_rate", ARM_LABELS.get(name, name), linestyle="--" if "flip" in name else "-")
            _series(length, arm_rows, "avg_length", ARM_LABELS.get(name, name), linestyle="--" if "flip" in name else "-")
    for name in ("sft", "seed_dpo"):
        if name in arms:
            win.axhline(arms[name][0]["win_rate"], color="grey", linestyle=":" if name == "sft" else "-.", linewidth=1,
                        label=ARM_LABELS[name])
    win.set_title("oracle win rate vs pi_init (%)", fontsize=10)
    length.set_title("answer length on the evaluation prompts (tokens)", fontsize=10)
    _series(acc, rows, "self_label_accuracy", "SPA's judge")
    acc.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    acc.set_title("self-label accuracy (oracle agrees)", fontsize=10)
    _series(short, rows, "judge_shorter_wins", "judge")
    _series(short, rows, "oracle_shorter_wins", "oracle")
    short.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    short.set_title("shorter answer wins (unequal-length pairs)", fontsize=10)
    for key, label in (("sr_precision", "SR"), ("dnd_precision", "DND"), ("noise_rate", "noise rate (chance)")):
        _series(prec, rows, key, label)
    prec.set_title("flag precision on wrong labels", fontsize=10)
    flipped = arms.get("spa_flip", [])
    for key, label in (("sr_flip_precision", "SR"), ("dnd_flip_precision", "DND"), ("flip_rate", "flip rate (chance)")):
        _series(flip, flipped, key, label)
    flip.set_title("flag precision on injected flips", fontsize=10)
    for ax in axes.flat:
        ax.set_xlabel("iteration")
        ax.set_xticks([r["iteration"] for r in rows])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(target, dpi=90)
    plt.close(fig)
    return target


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{v:.1f}" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


ROUND_COLUMNS = [  # (key, header, percent)
    ("win_rate", "win rate %", True), ("lc_win_rate", "LC win rate %", True),
    ("self_label_accuracy", "self-label acc.", False), ("noise_rate", "noise rate", False),
    ("judge_shorter_wins", "judge: shorter wins", False), ("oracle_shorter_wins", "oracle: shorter wins", False),
    ("length_penalty", "length penalty a", False), ("sr_precision", "SR prec.", False),
    ("dnd_precision", "DND prec.", False), ("sr_recall", "SR recall", False), ("dnd_recall", "DND recall", False),
    ("sr_dnd_disagreement", "SR/DND disagree", False), ("refined_fraction", "refined share", False),
    ("gold_agreement", "gold agreement", False), ("mean_length", "judged length", False),
    ("avg_length", "eval length", False),
]


def rounds_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| iteration | " + " | ".join(h for _, h, _ in ROUND_COLUMNS) + " |",
             "|---" * (len(ROUND_COLUMNS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['iteration']} | " + " | ".join(_fmt(r.get(k), pct) for k, _, pct in ROUND_COLUMNS) + " |")
    return lines


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _final(arm_rows: list[dict[str, Any]], key: str = "win_rate"):
    return arm_rows[-1].get(key) if arm_rows else None


def target_checks(arms: dict[str, list[dict[str, Any]]]) -> list[tuple[str, bool | None, str]]:
    """The demo's claims, each (claim, holds, the numbers): what the report's checklist shows."""
    spa, dpo = arms.get("spa", []), arms.get("iterative_dpo", [])
    checks: list[tuple[str, bool | None, str]] = []
    first = spa[1] if len(spa) > 1 else {}
    acc, gold = first.get("self_label_accuracy"), spa[0].get("gold_agreement") if spa else None
    checks.append(("seed judge: self-label accuracy >= 0.70 at iteration 1",
                   None if acc is None else acc >= 0.70, _fmt(acc)))
    checks.append(("seed judge: held-out gold agreement >= 0.70", None if gold is None else gold >= 0.70, _fmt(gold)))
    order = [("spa", spa), ("iterative_dpo", dpo), ("seed_dpo", arms.get("seed_dpo", [])), ("sft", arms.get("sft", []))]
    for (hi, hi_rows), (lo, lo_rows) in itertools.pairwise(order):
        a, b = _final(hi_rows), _final(lo_rows)
        checks.append((f"final win rate: {ARM_LABELS[hi]} > {ARM_LABELS[lo]}",
                       None if a is None or b is None else a > b, f"{_fmt(a, True)} vs {_fmt(b, True)}"))
    l0, l_end = (spa[0].get("avg_length"), _final(spa, "avg_length")) if spa else (None, None)
    ratio = l_end / l0 if l0 and l_end is not None else None
    checks.append(("no length collapse or runaway: final length within +-30% of pi_0's",
                   None if ratio is None else 0.7 <= ratio <= 1.3, f"{_fmt(l_end)} vs {_fmt(l0)} ({_fmt(ratio)}x)"))
    mean_prec = _mean([r.get("sr_precision") for r in spa[1:]])
    # Eq. 10 on a flagged pair moves its expected gradient by alpha*beta*(2*precision - 1) towards the true label
    # (smoothing takes alpha from a right label's push and from a wrong label's alike): it can only help where
    # most flagged labels are wrong
    checks.append(("refinement can help: most of SR's flagged labels are wrong (precision > 0.5, Eq. 10's break-even)",
                   None if mean_prec is None else mean_prec > 0.5,
                   f"mean over iterations: {_fmt(mean_prec)}, noise rate "
                   + _fmt(_mean([r.get("noise_rate") for r in spa[1:]]))))
    flip = arms.get("spa_flip", [])
    for det in ("sr", "dnd"):
        pairs = [(r.get(f"{det}_flip_precision"), r.get("flip_rate")) for r in flip[1:]]
        pairs = [(p, f) for p, f in pairs if p is not None and f]
        lift = sum(p / f for p, f in pairs) / len(pairs) if pairs else None
        checks.append((f"under injected flips: {det.upper()} flag precision on flipped pairs >= 2x the flip rate",
                       None if lift is None else lift >= 2.0,
                       "mean over iterations: " + (f"{lift:.2f}x" if lift is not None else "-")))
    loss = {name: (_final(arms.get(name, [])), _final(arms.get(f"{name}_flip", []))) for name in ("spa", "iterative_dpo")}
    drops = {k: a - b for k, (a, b) in loss.items() if a is not None and b is not None}
    # near margin 0 a flip rate f scales DPO's expected gradient by 1 - 2f: where the rounds do not miss that
    # smaller step, flips cost nothing and there is no loss for refinement to reduce
    dpo_drop = drops.get("iterative_dpo")
    checks.append(("refinement has a loss to reduce: injected flips cost iterative DPO win rate",
                   None if dpo_drop is None else dpo_drop > 0,
                   "-" if dpo_drop is None else f"{ARM_LABELS['iterative_dpo']} loses {dpo_drop:.1f} points"))
    checks.append(("under injected flips: SPA loses less win rate than iterative DPO",
                   None if len(drops) < 2 else drops["spa"] < drops["iterative_dpo"],
                   ", ".join(f"{ARM_LABELS[k]} loses {v:.1f} points" for k, v in drops.items())))
    return checks


def arms_section(arms: dict[str, list[dict[str, Any]]]) -> list[str]:
    iters = max(len(r) for r in arms.values())
    lines = ["### The arms (same world, same pi_0, same prompts)", "",
             "| arm | " + " | ".join(f"win % t={t}" for t in range(iters)) + " | final LC win % | final length |",
             "|---" * (iters + 3) + "|"]
    for name, rows in arms.items():
        cells = [_fmt(rows[t].get("win_rate"), True) if t < len(rows) and (len(rows) > 1 or t == 0) else ""
                 for t in range(iters)]
        lines.append(f"| {ARM_LABELS.get(name, name)} | " + " | ".join(cells)
                     + f" | {_fmt(_final(rows, 'lc_win_rate'), True)} | {_fmt(_final(rows, 'avg_length'))} |")
    lines += ["", "### What the demo claims, checked on this run", "",
              "One seed; `bench/demo_arms.py` runs three and says which differences are within the seeds' spread.", ""]
    for claim, holds, numbers in target_checks(arms):
        mark = "n/a" if holds is None else "yes" if holds else "**no**"
        lines.append(f"- {claim}: {mark} ({numbers})")
    flip = arms.get("spa_flip", [])
    if len(flip) > 1:
        lines += ["", "### SPA under injected label flips (`judge.flip_fraction`)", "",
                  "| iteration | win rate % | flip rate | SR prec. on flips | DND prec. on flips | self-label acc. |",
                  "|---|---|---|---|---|---|"]
        for r in flip[1:]:
            lines.append(f"| {r['iteration']} | {_fmt(r.get('win_rate'), True)} | {_fmt(r.get('flip_rate'))} | "
                         f"{_fmt(r.get('sr_flip_precision'))} | {_fmt(r.get('dnd_flip_precision'))} | "
                         f"{_fmt(r.get('self_label_accuracy'))} |")
    return lines


def feature_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per iteration and oracle feature: the judge's accuracy on pairs that differ in it, and the samples' mean."""
    judged = [r for r in rows if r.get("judge_feature_accuracy")]
    if not judged:
        return []
    lines = ["### The judge on each oracle feature", "",
             "Judge: of the labelled pairs whose answers differ in the feature, the share whose chosen answer is "
             "the better one (0.5: the judge does not see it; below 0.5: it prefers the worse). Samples: the "
             "feature's mean over the judged answers of pi_{t-1}. `on_topic` is measured, not scored by the oracle.", "",
             "| iteration | " + " | ".join(f"{f}{'' if f in SCORED else ' (not scored)'}: judge / samples"
                                         for f in FEATURES) + " |",
             "|---" * (len(FEATURES) + 1) + "|"]
    for r in judged:
        cells = [f"{_fmt(r['judge_feature_accuracy'][f])} ({r['feature_pairs'][f]}) / {_fmt(r['sample_features'][f])}"
                 for f in FEATURES]
        lines.append(f"| {r['iteration']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def demo_section(rows: list[dict[str, Any]], plot_name: str, arms: dict[str, list[dict[str, Any]]] | None = None) -> str:
    lines = [
        "## Demo world (the oracle's view)", "",
        "Win rate: the oracle compares each model's answer with pi_init's on held-out evaluation prompts "
        "(alpaca-eval's `get_winrate`; 50% = no better than pi_init). Self-label accuracy: share of judged pairs "
        "whose label the oracle agrees with (noise rate = 1 - accuracy). Shorter wins: of the judged pairs of "
        "unequal length, how often the judge (and the oracle) names the shorter answer the winner; 0.5 is "
        "length-neutral. Precision/recall: how well the refinement flags (SR: pi_theta's own margin; DND: the "
        "extrapolated model of Eq. 12) find the labels the oracle calls wrong, after the denoising warm-up; "
        "flags no better than chance have a precision equal to the noise rate. SR/DND disagree: the share of "
        "samples that one detector flags and the other does not (near pi_ref the two agree to first order).", "",
        "### SPA, round by round", "", *rounds_table(rows), "", *feature_table(rows),
    ]
    if arms:
        lines += arms_section(arms) + [""]
    lines += [f"![demo metrics]({plot_name})", ""]
    return "\n".join(lines)


def write_demo_report(cfg: SPAConfig, arms: dict[str, list[dict[str, Any]]] | None = None) -> Path:
    """``report.md`` = the run report + the demo world's section (and its comparison arms) and plot."""
    from spa.stages.report import build_report

    lay = RunLayout.of(cfg)
    rows = run_metrics(cfg)
    plot(rows, lay.demo_plot, arms)
    write_text_atomic(lay.demo_metrics, json.dumps({"spa": rows, "arms": arms or {}}, indent=2))
    write_text_atomic(lay.report, build_report(cfg) + "\n" + demo_section(rows, lay.demo_plot.name, arms))
    return lay.report
