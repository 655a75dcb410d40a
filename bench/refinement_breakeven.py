"""Does self-refinement's effect follow its flag precision? A re-analysis of the demo-arm benches (no new runs).

For every SPA arm and round t, the change of its win-rate gap to the matching iterative-DPO arm (same seed, same
flip rate) from round t-1 to t, grouped by SR's flag precision in that round (the share of flagged pairs whose
label disagrees with the oracle) against the break-even of Eq. 10, 0.5 (``tests/test_losses.py``).

    python bench/refinement_breakeven.py   # reads every demo_arms JSON in bench/results, writes refinement_breakeven.json
    python bench/refinement_breakeven.py --run runs/demo/run   # also: which detector finds a demo run's wrong labels

With ``--run`` (a finished demo run, whose judge wrote oracle verdicts): per iteration, the share of wrong labels
(against the oracle) among the 10% of pairs each detector ranks least confident: the judge's own confidence
``|p - 0.5|``, SR's and DND's training confidence, and the pairs SR actually flagged.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = {  # group: [(SPA arm, its iterative-DPO arm)]
    "spa (clean)": [("spa", "iterative_dpo")],
    "spa (20%/40% flips)": [("spa_flip20", "iterative_dpo_flip20"), ("spa_flip40", "iterative_dpo_flip40")],
    "spa_strong (all)": [("spa_strong", "iterative_dpo"), ("spa_strong_flip20", "iterative_dpo_flip20"),
                         ("spa_strong_flip40", "iterative_dpo_flip40")],
}


def round_changes(results: dict) -> dict[str, list[tuple[float, float]]]:
    """Per group, (SR precision, change of the gap to iterative DPO in that round) for every seed and round."""
    out: dict[str, list[tuple[float, float]]] = {g: [] for g in GROUPS}
    for arms in results.values():
        for group, pairs in GROUPS.items():
            for arm, base in pairs:
                if arm not in arms or base not in arms:
                    continue
                prev = 0.0
                for r, q in zip(arms[arm][1:], arms[base][1:], strict=True):
                    gap = r["win_rate"] - q["win_rate"]
                    if r.get("sr_precision") is not None:
                        out[group].append((r["sr_precision"], gap - prev))
                    prev = gap
    return out


def summary(points: list[tuple[float, float]]) -> dict:
    above = [d for p, d in points if p > 0.5]
    below = [d for p, d in points if p <= 0.5]
    mean = lambda xs: round(statistics.mean(xs), 2) if xs else None  # noqa: E731
    sem = lambda xs: round(statistics.stdev(xs) / len(xs) ** 0.5, 2) if len(xs) > 1 else None  # noqa: E731
    corr = statistics.correlation([p for p, _ in points], [d for _, d in points]) if len(points) > 2 else None
    return {"rounds": len(points), "precision_range": [min(p for p, _ in points), max(p for p, _ in points)],
            "above_break_even": {"rounds": len(above), "mean_change": mean(above), "sem": sem(above)},
            "at_or_below": {"rounds": len(below), "mean_change": mean(below), "sem": sem(below)},
            "correlation": None if corr is None else round(corr, 2)}


def detector_precision(run: Path, k_share: float = 0.10) -> list[dict]:
    """Per iteration of a demo run: wrong-label share among each detector's least confident ``k_share`` of pairs."""
    import numpy as np
    import pyarrow.parquet as pq

    rows = []
    t = 1
    while (run / f"iter_{t}" / "refinement.parquet").exists():
        it = run / f"iter_{t}"
        d = (pq.read_table(it / "judgments.parquet").to_pandas()
             .merge(pq.read_table(it / "oracle_verdicts.parquet").to_pandas(), on="prompt_id")
             .merge(pq.read_table(it / "refinement.parquet").to_pandas(), on="prompt_id"))
        d = d[d.oracle_verdict != 1.5]  # oracle ties: neither label is wrong
        wrong = (d.oracle_verdict == 2.0).to_numpy()
        k = max(1, int(len(d) * k_share))
        row = {"t": t, "pairs": len(d), "noise_rate": round(float(wrong.mean()), 3)}
        for name, score in (("judge_confidence", np.abs(d.p_chosen.to_numpy() - 0.5)),
                            ("sr_confidence", d.confidence_sr.to_numpy()), ("dnd_confidence", d.confidence_dnd.to_numpy())):
            row[name] = round(float(wrong[np.argsort(score, kind="stable")[:k]].mean()), 3)
        row["sr_flagged"] = round(float(wrong[d.z_sr.to_numpy() == 1].mean()), 3)
        rows.append(row)
        t += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a finished demo run directory (optional)")
    args = ap.parse_args()
    points: dict[str, list] = {g: [] for g in GROUPS}
    sources = sorted(RESULTS.glob("demo_arms*.json"))
    for path in sources:
        for g, pts in round_changes(json.loads(path.read_text())["results"]).items():
            points[g] += pts
    out = {"benchmark": "refinement break-even (re-analysis)", "sources": [p.name for p in sources],
           "groups": {g: summary(p) for g, p in points.items() if p}}
    if args.run:
        out["detectors"] = {"run": str(args.run), "rounds": detector_precision(args.run)}
    (RESULTS / "refinement_breakeven.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
