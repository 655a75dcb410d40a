"""P5 (issue: performance): orchestration overhead of the demo pipeline. Goal: everything that is not a
stage's own work (Prefect, process starts, imports, hashing) <= 3% of the demo's wall time.

The same demo-world run three times, side by side: (a) ``spa run`` with ``stage_processes: separate`` (the
Prefect flow, one process per stage task), (b) ``spa run`` with ``stage_processes: inline`` (the same flow,
stages in the flow's process; what ``spa demo`` uses), and (c) the same stages called in this process one
after another (no Prefect, one import of torch/transformers). Per stage, the manifest records the stage's own
wall time (its body: model loading, compute, artifact I/O, output hashing). Overhead of a flow = its wall
time minus the sum of its stages' own times; (c) bounds what orchestration could save at best.

    python bench/p5_overhead.py [--small]     # writes bench/results/p5_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spa.config import parse_config  # noqa: E402
from spa.demo.run import SMALL, WorldSizes, build_world, demo_config, write_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def stage_times(run_dir: Path) -> dict[str, float]:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {k: v["wall_time_s"] for k, v in stages.items()}


def in_process(cfg) -> float:
    from spa.stages import evaluate, prepare, report, sample, train
    from spa.stages import judge as judge_stage

    quiet = lambda _m: None  # noqa: E731
    start = time.perf_counter()
    prepare.run(cfg, echo=quiet)
    train.run(cfg, 0, echo=quiet)
    evaluate.run(cfg, 0, echo=quiet)
    for t in range(1, cfg.iterations + 1):
        sample.run(cfg, t, echo=quiet)
        judge_stage.run(cfg, t, echo=quiet)
        train.run(cfg, t, echo=quiet)
        evaluate.run(cfg, t, echo=quiet)
    report.run(cfg, echo=quiet)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the small world (tests' size)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/spa-p5"))
    ns = parser.parse_args()
    sizes = SMALL if ns.small else WorldSizes()
    world = build_world(ns.out / "world", seed=0, sizes=sizes)
    import shutil

    result: dict = {}
    per_stage: dict = {}
    for mode in ("separate", "inline"):
        shutil.rmtree(ns.out / mode, ignore_errors=True)
        raw = demo_config(world, ns.out / mode / "run", sizes) | {"stage_processes": mode}
        flow_cfg = write_config(raw, ns.out / mode / "config.yaml")
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "spa"), "run", str(flow_cfg)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        stages = stage_times(ns.out / mode / "run")
        own = sum(stages.values())
        result[f"flow_{mode}"] = {"wall_s": round(wall, 1), "stage_time_s": round(own, 1),
                                  "overhead_s": round(wall - own, 1), "overhead_share": round((wall - own) / wall, 3)}
        for k, v in stages.items():
            per_stage.setdefault(k, {})[f"flow_{mode}"] = v
        print(mode, json.dumps(result[f"flow_{mode}"]), flush=True)
    shutil.rmtree(ns.out / "inproc", ignore_errors=True)
    inproc_wall = in_process(parse_config(demo_config(world, ns.out / "inproc" / "run", sizes)))
    inproc_stages = stage_times(ns.out / "inproc" / "run")
    for k, v in inproc_stages.items():
        per_stage.setdefault(k, {})["in_process"] = v
    result["in_process"] = {"wall_s": round(inproc_wall, 1), "stage_time_s": round(sum(inproc_stages.values()), 1)}
    # Stage bodies import torch/transformers lazily, so "wall - stage time" misses imports paid inside a
    # stage's process. The honest yardstick is the in-process run (the same stages, imports paid once,
    # before the clock): everything a flow adds on top of it is orchestration.
    for mode in ("separate", "inline"):
        r = result[f"flow_{mode}"]
        r["overhead_vs_in_process_s"] = round(r["wall_s"] - inproc_wall, 1)
        r["overhead_vs_in_process_share"] = round((r["wall_s"] - inproc_wall) / r["wall_s"], 3)
    result["per_stage_s"] = per_stage
    print(json.dumps(result, indent=1))
    import torch

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p5_overhead.json").write_text(json.dumps({
        "benchmark": "P5 orchestration overhead of the demo pipeline (spa run, stages separate or inline, vs the "
                     "same stages in one process)",
        "goal": {"overhead_share": 0.03},
        "command": "python bench/p5_overhead.py" + (" --small" if ns.small else ""),
        "sizes": sizes.__dict__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": result,
    }, indent=2))


if __name__ == "__main__":
    main()
