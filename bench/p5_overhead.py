"""P5 (issue: performance): orchestration overhead of the demo pipeline. Goal: everything that is not a
stage's own work (Prefect, process starts, imports, hashing) <= 3% of the demo's wall time.

The same demo-world run twice, side by side: (a) ``spa run`` (the Prefect flow, one process per
stage task) and (b) the same stages called in this process one after another (no Prefect, one import
of torch/transformers). Per stage, the manifest records the stage's own wall time (its body: model
loading, compute, artifact I/O, output hashing). Overhead of (a) = its wall time minus the sum of its
stages' own times; (b) bounds what orchestration could save at best.

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

    shutil.rmtree(ns.out / "flow", ignore_errors=True)
    shutil.rmtree(ns.out / "inproc", ignore_errors=True)
    flow_cfg = write_config(demo_config(world, ns.out / "flow" / "run", sizes), ns.out / "flow" / "config.yaml")
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "spa"), "run", str(flow_cfg)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flow_wall = time.perf_counter() - start
    flow_stages = stage_times(ns.out / "flow" / "run")
    inproc_wall = in_process(parse_config(demo_config(world, ns.out / "inproc" / "run", sizes)))
    inproc_stages = stage_times(ns.out / "inproc" / "run")
    own = sum(flow_stages.values())
    result = {
        "flow_wall_s": round(flow_wall, 1), "flow_stage_time_s": round(own, 1),
        "flow_overhead_s": round(flow_wall - own, 1), "flow_overhead_share": round((flow_wall - own) / flow_wall, 3),
        "in_process_wall_s": round(inproc_wall, 1), "in_process_stage_time_s": round(sum(inproc_stages.values()), 1),
        "per_stage_s": {k: {"flow": flow_stages[k], "in_process": inproc_stages.get(k)} for k in flow_stages},
    }
    print(json.dumps(result, indent=1))
    import torch

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p5_overhead.json").write_text(json.dumps({
        "benchmark": "P5 orchestration overhead of the demo pipeline (spa run vs the same stages in one process)",
        "goal": {"overhead_share": 0.03},
        "command": "python bench/p5_overhead.py" + (" --small" if ns.small else ""),
        "sizes": sizes.__dict__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": result,
    }, indent=2))


if __name__ == "__main__":
    main()
