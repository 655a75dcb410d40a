"""``spa report``: ``report.md`` with the per-iteration table (the shape of the paper's Table 1)."""

from __future__ import annotations

import json

from spa.config import SPAConfig
from spa.run.artifacts import write_text_atomic
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, Stage
from spa.run.stage_runner import StageResult


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def build_report(cfg: SPAConfig) -> str:
    layout = RunLayout.of(cfg)
    stages = Manifest(layout.manifest).entries()
    lines = [
        f"# SPA run `{layout.root}`", "",
        f"pi_init: `{cfg.model.pi_init}`; iterations: {cfg.iterations}; judge: implicit reward against "
        f"`{cfg.judge.reference}` (beta {cfg.judge.beta}); refinement: SR={cfg.train.refinement.self_refine}, "
        f"DND={cfg.train.refinement.decoupled}.", "",
        "| iteration | pairs | ties | truncated pairs | mean p_chosen | final loss | refined share | "
        "gold agreement | win rate | LC win rate | avg length |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    t = 0
    while layout.iteration(t).exists():
        judge = stages.get(Stage.JUDGE.key(t), {}).get("summary", {})
        train = stages.get(Stage.TRAIN.key(t), {}).get("summary", {})
        ev_path = layout.eval_summary(t)
        ev = json.loads(ev_path.read_text()) if ev_path.exists() else {}
        lines.append("| " + " | ".join([
            str(t), _fmt(judge.get("pairs")), _fmt(judge.get("ties")), _fmt(judge.get("truncated_pairs")),
            _fmt(judge.get("mean_p_chosen")), _fmt(train.get("final_loss")),
            _fmt(train.get("mean_refined_fraction")), _fmt(ev.get("gold_agreement")), _fmt(ev.get("win_rate")),
            _fmt(ev.get("lc_win_rate")), _fmt(ev.get("avg_length"), 1),
        ]) + " |")
        t += 1
    lines += ["", "Iteration 0 is the seed stage (DPO of pi_init on the gold seed pairs).", ""]
    lines += diagnostics_table(stages, cfg.iterations)
    lines += evaluation_table(layout)
    lines += instruction_table(layout)
    return "\n".join(lines)


def instruction_table(layout: RunLayout) -> list[str]:
    """IFEval's four accuracies (%) of every instruction-following set, per iteration, with n, the prompts not
    checkable here, the answers' mean length and the share cut at the length cap."""
    rows, t = [], 0
    while layout.iteration(t).exists():
        path = layout.eval_summary(t)
        sets = json.loads(path.read_text()).get("instruction_following", {}) if path.exists() else {}
        for name, got in sets.items():
            pct = [_fmt(None if got.get(k) is None else 100 * got[k], 1)
                   for k in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")]
            rows.append(f"| {'pi_0 (seed DPO)' if t == 0 else f'pi_{t}'} | {name} | " + " | ".join(pct)
                        + f" | {got.get('n')} ({got.get('skipped')} skipped) | {_fmt(got.get('avg_length'), 1)} | "
                        f"{_fmt(None if got.get('truncated_share') is None else 100 * got['truncated_share'], 1)} |")
        t += 1
    if not rows:
        return []
    return ["## Instruction following (IFEval's accuracies, %; greedy answers)", "",
            "| model | set | prompt strict | prompt loose | instruction strict | instruction loose | n | "
            "avg length (tokens) | truncated (%) |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


DIAGNOSTICS = [  # (stage, key, header)
    ("judge", "judge_shorter_wins", "judge: shorter wins"), ("judge", "oracle_shorter_wins", "oracle: shorter wins"),
    ("judge", "length_penalty", "length penalty a"), ("judge", "mean_length", "judged length"),
    ("judge", "self_label_accuracy", "self-label acc."), ("judge", "noise_rate", "noise rate"),
    ("train", "sr_precision", "SR prec."), ("train", "dnd_precision", "DND prec."),
    ("train", "sr_dnd_disagreement", "SR/DND disagree"), ("train", "flip_rate", "flip rate"),
    ("train", "sr_flip_precision", "SR prec. on flips"), ("train", "dnd_flip_precision", "DND prec. on flips"),
]


def diagnostics_table(stages: dict, iterations: int) -> list[str]:
    """What the labels and the refinement flags are worth, per iteration (``spa.judges.diagnostics``); columns
    that no iteration has (no oracle, no flips, SR off) are left out."""
    rows = [(t, stages.get(Stage.JUDGE.key(t), {}).get("summary", {}), stages.get(Stage.TRAIN.key(t), {}).get("summary", {}))
            for t in range(1, iterations + 1)]
    rows = [r for r in rows if r[1] or r[2]]
    cols = [(stage, key, head) for stage, key, head in DIAGNOSTICS
            if any((judge if stage == "judge" else train).get(key) is not None for _, judge, train in rows)]
    if not rows or not cols:
        return []
    lines = ["## Labels and refinement flags", "",
             "Shorter wins: of the labelled pairs of unequal length, the share whose chosen answer is the shorter "
             "(0.5 is length-neutral). Self-label accuracy and the noise rate need `judge.oracle`. A flag precision "
             "equal to the noise rate (or the flip rate) is chance; SR/DND disagree is the share of samples that "
             "only one of the two detectors flags.", "",
             "| iteration | " + " | ".join(h for _, _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for t, judge, train in rows:
        lines.append(f"| {t} | " + " | ".join(_fmt((judge if stage == "judge" else train).get(key))
                                              for stage, key, _ in cols) + " |")
    return [*lines, ""]


def _pm(value, err) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {err:.2f}" if err is not None else "")


def evaluation_table(layout: RunLayout) -> list[str]:
    """The evaluation per iteration in the columns of the paper's Table 1: gold-label share (the seed
    size is the config's), AlpacaEval 2.0 length-controlled win rate and win rate against the
    reference outputs, MT-Bench average; plus held-out gold agreement and length."""
    rows, notes = [], []
    t = 0
    while layout.iteration(t).exists():
        path = layout.eval_summary(t)
        if path.exists():
            ev = json.loads(path.read_text())
            mt = ev.get("mt_bench") or {}
            rows.append("| " + " | ".join([
                "pi_0 (seed DPO)" if t == 0 else f"pi_{t} (SPA iter {t})",
                _pm(ev.get("lc_win_rate"), ev.get("lc_standard_error")),
                _pm(ev.get("win_rate"), ev.get("standard_error")),
                _fmt(mt.get("score"), 2), _fmt(ev.get("gold_agreement")), _fmt(ev.get("avg_length"), 1),
                f"{ev.get('eval_set', '-')} (n={ev.get('n', '-')}"
                + (f" of {ev['eval_set_size']}, a subset" if ev.get("eval_set_size") else "") + ")",
                str(ev.get("annotator") or "-"),
                str(ev.get("lc_model") or "-"),
            ]) + " |")
            for key in ("win_rate_note", "lc_note"):
                if ev.get(key):
                    notes.append(f"- iteration {t}: {ev[key]}")
            if mt.get("note"):
                notes.append(f"- iteration {t}, MT-Bench: {mt['note']}")
        t += 1
    if not rows:
        return []
    return ["## Evaluation (the shape of the paper's Table 1)", "",
            "| model | LC win rate (%) | win rate (%) | MT-Bench | gold agreement | avg length (tokens) | "
            "eval set | annotator | LC model |",
            "|---|---|---|---|---|---|---|---|---|", *rows, "", *notes, ""]


def run(cfg: SPAConfig, force: bool = False, echo=print) -> StageResult:
    """Write ``report.md`` from the run directory as it is now. Always rewritten (it reads every finished stage, and
    costs milliseconds), so it keeps no manifest entry and ``force`` changes nothing."""
    layout = RunLayout.of(cfg)
    write_text_atomic(layout.report, build_report(cfg))
    echo(f"[report] wrote {layout.report}")
    return StageResult("report", False, [str(layout.report)], {"report": str(layout.report)})
