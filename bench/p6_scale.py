"""P6 (issue: performance): memory of ``prepare``, ``judge`` and the artifact readers from 10K to 1M prompts.
Goal: flat peak RSS (streamed, not loaded whole); also prepare's dedup throughput.

Each measurement runs in a fresh process and reports its peak RSS (``ru_maxrss``):
- ``reader``: ``spa.run.artifacts.iter_chunks`` over a ``responses.parquet`` of N prompts x 2 responses;
- ``prepare``: the prepare stage on a Parquet source of N synthetic preference pairs (1% duplicates);
- ``judge``: the judge stage on N prompts with the tiny model (10K and 100K only: 1M would take hours on CPU).

    python bench/p6_scale.py                  # writes bench/results/p6_scale.json
    python bench/p6_scale.py --kinds prepare  # re-measure some kinds, keep the file's other results
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/spa-p6")


def make_responses(n: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                                            ("responses", pa.list_(pa.string())),
                                            ("finish_reasons", pa.list_(pa.string())),
                                            ("num_tokens", pa.list_(pa.int32())), ("model", pa.string())])) as w:
        for start in range(0, n, 50_000):
            k = min(50_000, n - start)
            w.write_table(pa.table({
                "prompt_id": [f"p{i}" for i in range(start, start + k)],
                "prompt": [f"Tell me about item {i}." for i in range(start, start + k)],
                "responses": [[f"apple {i % 7}", f"pear {i % 5} plum"] for i in range(start, start + k)],
                "finish_reasons": [["stop", "stop"]] * k,
                "num_tokens": pa.array([[2, 3]] * k, pa.list_(pa.int32())),
                "model": ["bench"] * k,
            }))


def make_source(n: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("prompt", pa.string()), ("chosen", pa.string()),
                                            ("rejected", pa.string())])) as w:
        for start in range(0, n, 50_000):
            k = min(50_000, n - start)
            ids = [i if i % 100 else i - 1 for i in range(start, start + k)]  # 1% duplicate prompts
            w.write_table(pa.table({"prompt": [f"Write about topic {i}, please." for i in ids],
                                    "chosen": [f"Topic {i} is good." for i in ids],
                                    "rejected": ["no"] * k}))


def child(kind: str, n: int) -> dict:
    import resource

    start = time.perf_counter()
    if kind == "reader":
        from spa.run.artifacts import iter_chunks

        rows = sum(t.num_rows for _, t in iter_chunks(WORK / f"responses_{n}.parquet", "responses", 1024))
        assert rows == n
        extra = {}
    else:
        from spa.config import parse_config
        from spa.stages import judge, prepare

        run = WORK / f"{kind}_{n}"
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        model = WORK / "tiny"
        prompts = n if kind == "judge" else int(n * 0.5)
        cfg = parse_config({"run_dir": str(run), "iterations": 1,
                            "model": {"pi_init": str(model), "pi_0": str(model), "max_length": 64},
                            "data": {"source": str(WORK / f"source_{n}.parquet"), "seed_size": 100,
                                     "prompt_sizes": [prompts if kind == "prepare" else 10], "heldout_size": 100},
                            "sample": {"max_new_tokens": 16},  # room for the prompt in a 64-token context
                            "judge": {"batch_size": 256, "reference": "none"}})
        if kind == "prepare":
            res = prepare.run(cfg, echo=lambda _m: None)
            extra = {"rows_per_s": round(n / (time.perf_counter() - start)), "report": res.summary}
        else:
            from spa.run.layout import RunLayout

            prepare.run(cfg, echo=lambda _m: None)
            lay = RunLayout(cfg.run_dir)
            lay.iteration(1).mkdir(parents=True, exist_ok=True)
            os.link(WORK / f"responses_{n}.parquet", lay.responses(1))
            start = time.perf_counter()
            judge.run(cfg, 1, echo=lambda _m: None)
            extra = {"prompts_per_s": round(n / (time.perf_counter() - start))}
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "seconds": round(time.perf_counter() - start, 1), **extra}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    kinds = ("reader", "prepare", "judge")
    if len(sys.argv) > 2 and sys.argv[1] == "--kinds":
        kinds = tuple(sys.argv[2].split(","))
    target = ROOT / "bench" / "results" / "p6_scale.json"
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "tiny").exists():
        from spa.models.tiny import build_tiny_model

        build_tiny_model(WORK / "tiny", seed=0)
    sizes = [10_000, 100_000, 1_000_000]
    results: dict[str, dict[str, dict]] = {"reader": {}, "prepare": {}, "judge": {}}
    if target.exists() and len(kinds) < 3:
        results |= {k: v for k, v in json.loads(target.read_text())["results"].items() if k not in kinds}
    for n in sizes:
        make_responses(n, WORK / f"responses_{n}.parquet")
        make_source(n, WORK / f"source_{n}.parquet")
        for kind in kinds:
            if kind == "judge" and n > 100_000:
                continue
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(n)], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if out.returncode != 0:
                results[kind][str(n)] = {"error": out.stderr.strip().splitlines()[-1][:300]}
            else:
                results[kind][str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(kind, n, results[kind][str(n)], flush=True)
    import torch

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({
        "benchmark": "P6 peak RSS of prepare, judge and the artifact reader at 10K / 100K / 1M prompts",
        "goal": "flat peak RSS from 10K to 1M (streamed)",
        "command": "python bench/p6_scale.py",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
