"""Demo-world benchmark: does SPA beat iterative DPO, seed-only DPO and SFT? (issue: demo world)

For each seed: build the world (pi_init, gold data, reference outputs), run the seed stage
once, then the iterative arms from copies of that run (the manifest is relocatable, so the
copies skip prepare and seed). Stages run in this process, through the same stage code as
`spa run`. Results: bench/results/demo_arms.json and a Markdown table (printed, and written
to bench/results/demo_arms.md).

    python bench/demo_arms.py --seeds 0 1 2 --out /tmp/spa-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from spa.config import parse_config  # noqa: E402
from spa.demo.metrics import run_metrics  # noqa: E402
from spa.demo.run import WorldSizes, build_world, demo_config  # noqa: E402
from spa.stages import evaluate, judge, prepare, sample, train  # noqa: E402

ARMS = {
    # name: (self_refine, decoupled)
    "iterative_dpo": (False, False),
    "spa_sr": (True, False),
    "spa_sr_dnd": (True, True),
}
ROOT = Path(__file__).resolve().parents[1]


def quiet(_msg: str) -> None:
    pass


def run_seed(seed: int, out: Path, sizes: WorldSizes, overrides: dict) -> dict[str, list[dict]]:
    world = build_world(out / f"world_{seed}", seed=seed, sizes=sizes)
    results: dict[str, list[dict]] = {}
    # SFT: pi_init itself (no-seed mode: pi_0 = pi_init), evaluated against its own reference answers
    sft = demo_config(world, out / f"s{seed}" / "sft", sizes, seed=seed)
    sft["model"]["pi_0"] = sft["model"]["pi_init"]
    cfg = parse_config(sft)
    prepare.run(cfg, echo=quiet)
    evaluate.run(cfg, 0, echo=quiet)
    results["sft"] = run_metrics(cfg)[:1]
    # seed-only DPO: iteration 0 of the shared base run
    base_raw = demo_config(world, out / f"s{seed}" / "base", sizes, seed=seed)
    _merge(base_raw, overrides)
    base = parse_config(base_raw)
    prepare.run(base, echo=quiet)
    train.run(base, 0, echo=quiet)
    evaluate.run(base, 0, echo=quiet)
    results["seed_dpo"] = run_metrics(base)[:1]
    for arm, (sr, dnd) in ARMS.items():
        run_dir = out / f"s{seed}" / arm
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base.run_dir, run_dir)
        raw = demo_config(world, run_dir, sizes, seed=seed, self_refine=sr, decoupled=dnd)
        _merge(raw, overrides)
        cfg = parse_config(raw)
        started = time.time()
        for t in range(1, cfg.iterations + 1):
            sample.run(cfg, t, echo=quiet)
            judge.run(cfg, t, echo=quiet)
            train.run(cfg, t, echo=quiet)
            evaluate.run(cfg, t, echo=quiet)
        results[arm] = run_metrics(cfg)
        print(f"seed {seed} {arm}: " + ", ".join(f"{r['win_rate']:.1f}" for r in results[arm])
              + f"  ({time.time() - started:.0f}s)", flush=True)
    return results


def _merge(raw: dict, overrides: dict) -> None:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value


def table(all_results: dict[int, dict[str, list[dict]]]) -> str:
    arms = ["sft", "seed_dpo", *ARMS]
    iters = max(len(r) for res in all_results.values() for r in res.values())
    lines = ["| arm | " + " | ".join(f"iter {t}" for t in range(iters)) + " |",
             "|---|" + "---|" * iters]
    for arm in arms:
        cells = []
        for t in range(iters):
            vals = [res[arm][t]["win_rate"] for res in all_results.values() if arm in res and len(res[arm]) > t]
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("/tmp/spa-bench"))
    parser.add_argument("--set", action="append", default=[], help="config override key=value (all arms)")
    parser.add_argument("--name", default="demo_arms")
    parser.add_argument("--seed-pairs", type=int, default=WorldSizes().seed_pairs)
    ns = parser.parse_args()
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in ns.set)}
    sizes = WorldSizes(seed_pairs=ns.seed_pairs)
    started = time.time()
    all_results = {seed: run_seed(seed, ns.out, sizes, overrides) for seed in ns.seeds}
    md = table(all_results)
    print(md)
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{ns.name}.json").write_text(json.dumps({
        "benchmark": "demo world arms: oracle win rate vs pi_init (%) per iteration, mean ± stdev over seeds",
        "command": "python bench/demo_arms.py " + " ".join(sys.argv[1:]),
        "seeds": ns.seeds, "overrides": overrides, "sizes": sizes.__dict__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "wall_time_s": round(time.time() - started, 1),
        "results": {str(k): v for k, v in all_results.items()},
        "table": md,
    }, indent=2))
    (results_dir / f"{ns.name}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
