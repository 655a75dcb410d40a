"""Demo-world benchmark of the variants (issue: loss and labelling variants; docs/variants.md).

For each seed: build the world, run prepare + seed DPO + a tiny Bradley-Terry reward model once,
then every arm from a copy of that run, 3 iterations each, through the same stage code as `spa run`.
Reports the oracle win rate vs pi_init and the self-label accuracy (judge label vs oracle) per
iteration, mean ± stdev over seeds; and a label-noise sweep (flip 0 / 20 / 40 %) for DPO, SR, DND, DRO.

    python bench/variant_arms.py --seeds 0 1 2 --out /tmp/spa-variants
    python bench/variant_arms.py --seeds 0 1 2 --out /tmp/spa-variants --resume   # after a kill
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from spa.demo.arms import NO_REFINE, run_arm, run_seed_stage  # noqa: E402
from spa.demo.run import WorldSizes, build_world, demo_config  # noqa: E402
from spa.stages import train_rm  # noqa: E402

ARMS = {
    "dpo": NO_REFINE,
    "spa": {},
    "spa_rpo": {"train.loss": "rpo"},
    "spa_spo": {"train.loss": "spo", "train.spo.width": 64},
    "spa_dro": {"train.loss": "dro"},
    "spa_sr_dro": {"train.loss": "sr+dro"},
    "dice": {**NO_REFINE, "sample.n": 8, "judge.select": "best_worst", "judge.length_penalty": "auto",
             "train.replay_fraction": 0.25},
    "dpo_rm_judge": {**NO_REFINE, "judge.type": "external_rm"},
    # an LLM judge gives a preference, not a reward: no length penalty can be solved for it
    "dpo_llm_judge": {**NO_REFINE, "judge.type": "llm_judge", "judge.length_penalty": 0.0},
}
NOISE_ARMS = {
    "dpo": NO_REFINE,
    "sr": {"train.refinement.decoupled": False},
    "dnd": {},
    "dro": {"train.loss": "dro"},
}
NOISE_LEVELS = [0.0, 0.2, 0.4]
ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, out: Path, sizes: WorldSizes, arms: dict, noise: bool,
             resume: bool = False) -> dict[str, list[dict]]:
    world = build_world(out / f"world_{seed}", seed=seed, sizes=sizes)
    rm_dir = out / f"s{seed}" / "reward_model"
    base_raw = demo_config(world, out / f"s{seed}" / "base", sizes, seed=seed)
    base_raw["judge"]["reward_model"] = str(rm_dir)
    base = run_seed_stage(base_raw)
    train_rm.run(base, echo=lambda _m: None)
    results: dict[str, list[dict]] = {}
    jobs = [(name, over) for name, over in arms.items()]
    if noise:
        jobs += [(f"noise{int(f * 100)}_{name}", {**over, "judge.flip_fraction": f})
                 for f in NOISE_LEVELS for name, over in NOISE_ARMS.items()]
    for name, over in jobs:
        started = time.time()
        rows = run_arm(Path(base.run_dir), out / f"s{seed}" / name, base_raw, over, resume=resume)
        results[name] = [{k: r.get(k) for k in ("iteration", "win_rate", "self_label_accuracy", "avg_length")}
                         for r in rows]
        print(f"seed {seed} {name}: win " + ", ".join(f"{r['win_rate']:.1f}" for r in results[name])
              + "; label acc " + ", ".join(f"{r['self_label_accuracy']:.2f}" for r in results[name][1:]
                                           if r["self_label_accuracy"] is not None)
              + f"  ({time.time() - started:.0f}s)", flush=True)
    return results


def _cell(vals: list[float], pct: bool) -> str:
    if not vals:
        return ""
    fmt = (lambda v: f"{v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return fmt(vals[0]) if len(vals) == 1 else f"{fmt(statistics.mean(vals))} ± {fmt(statistics.stdev(vals))}"


def table(all_results: dict[int, dict[str, list[dict]]], names: list[str]) -> str:
    iters = max(len(r) for res in all_results.values() for r in res.values())
    head = ["arm", *[f"win iter {t}" for t in range(iters)], *[f"label acc iter {t}" for t in range(1, iters)]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm in names:
        cells = []
        for key, rng, pct in (("win_rate", range(iters), True), ("self_label_accuracy", range(1, iters), False)):
            for t in rng:
                vals = [res[arm][t][key] for res in all_results.values()
                        if arm in res and len(res[arm]) > t and res[arm][t][key] is not None]
                cells.append(_cell(vals, pct))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/spa-variants"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--no-noise", action="store_true", help="skip the label-noise sweep")
    parser.add_argument("--name", default="variant_arms")
    parser.add_argument("--resume", action="store_true",
                        help="keep the arm directories an earlier (killed) run left in --out; up-to-date stages are skipped")
    ns = parser.parse_args()
    sizes = WorldSizes()
    arms = {k: ARMS[k] for k in ns.arms}
    started = time.time()
    all_results = {seed: run_seed(seed, ns.out, sizes, arms, not ns.no_noise, ns.resume) for seed in ns.seeds}
    names = list(all_results[ns.seeds[0]])
    md = table(all_results, [n for n in names if not n.startswith("noise")])
    noise_names = [n for n in names if n.startswith("noise")]
    if noise_names:
        md += "\n\nLabel-noise sweep (judge.flip_fraction):\n\n" + table(all_results, noise_names)
    print(md)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{ns.name}.json").write_text(json.dumps({
        "benchmark": "demo world, variants: oracle win rate vs pi_init (%) and self-label accuracy per iteration, "
                     "mean ± stdev over seeds",
        "command": "python bench/variant_arms.py " + " ".join(sys.argv[1:]),
        "seeds": ns.seeds, "arms": arms, "noise_arms": NOISE_ARMS if noise_names else None,
        "noise_levels": NOISE_LEVELS if noise_names else None, "sizes": sizes.__dict__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "packages": {m: version(m) for m in ("torch", "transformers")}},  # worlds differ across versions
        "wall_time_s": round(time.time() - started, 1),
        "resumed": ns.resume,  # wall time then counts only the arms this invocation ran
        "results": {str(k): v for k, v in all_results.items()},
        "table": md,
    }, indent=2))
    (results_dir / f"{ns.name}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
