"""Reference log-probs computed once (``train.precompute_reference``) vs a reference model run every step.

The seed stage (3 epochs, plain DPO: no DND, so the reference enters only as sequence log-probs) on the same
model, pairs and config, side by side: ``spa seed`` in a fresh process per arm, arms alternating twice
(drift on a shared machine hits both), the faster of the two runs per arm. Reported: the stage's wall time
(from the manifest), the process's peak RSS (CPU; on a GPU the saving is one model's weights in memory),
and the largest gap between the two arms' per-step losses.

    python bench/reference_once.py          # writes bench/results/reference_once.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta river stone cloud music paper green quick slow bright dark warm cold seven "
         "three answer question list item write short long simple clear").split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def build(root: Path, pairs: int, hidden: int, layers: int) -> Path:
    from spa.models.tiny import build_tiny_model

    model = build_tiny_model(root / "pi_init", hidden_size=hidden, layers=layers, heads=max(2, hidden // 64), seed=0)
    rng = random.Random(0)
    with (root / "prefs.jsonl").open("w") as f:
        for i in range(pairs):
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": f"{i} " + _text(rng, 8, 20),
                                "chosen": _text(rng, 20, 60), "rejected": _text(rng, 20, 60)}) + "\n")
    return model


def config(root: Path, arm: str, model: Path, pairs: int) -> Path:
    cfg = {
        "run_dir": str(root / arm), "iterations": 1,
        "model": {"pi_init": str(model), "max_length": 512},
        "data": {"source": str(root / "prefs.jsonl"), "seed_size": pairs - 20, "prompt_sizes": [10], "heldout_size": 10},
        "train": {"batch_size": 16, "micro_batch_size": 8, "seed_epochs": 3, "learning_rate": 1e-4,
                  "save_steps": 10**6, "precompute_reference": arm == "precomputed"},
    }
    path = root / f"{arm}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_arm(spa: str, path: Path, run_dir: Path) -> dict:
    import shutil

    shutil.rmtree(run_dir / "iter_0", ignore_errors=True)
    manifest = run_dir / "manifest.json"
    if manifest.exists():  # keep prepare, forget the seed stage
        m = json.loads(manifest.read_text())
        m["stages"].pop("seed", None)
        manifest.write_text(json.dumps(m))
    subprocess.run([spa, "prepare", "-c", str(path)], check=True, capture_output=True)
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", spa, "seed", "-c", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    stage_s = json.loads(manifest.read_text())["stages"]["seed"]["wall_time_s"]
    import pyarrow.parquet as pq

    losses = pq.read_table(run_dir / "iter_0" / "train_log.parquet").column("loss").to_pylist()
    return {"stage_s": stage_s, "process_s": wall, "peak_rss_mb": peak_kb / 1024, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=220)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--root", type=Path, default=Path("/tmp/spa-reference-once"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reference_once.json")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.root.mkdir(parents=True, exist_ok=True)
    model = build(a.root, a.pairs, a.hidden, a.layers)
    spa = str(Path(sys.executable).parent / "spa")
    arms = ("online", "precomputed")
    paths = {arm: config(a.root, arm, model, a.pairs) for arm in arms}
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for _rep in range(2):
        for arm in arms:
            res = run_arm(spa, paths[arm], a.root / arm)
            print(arm, {k: v for k, v in res.items() if k != "losses"}, flush=True)
            runs[arm].append(res)
    best = {arm: min(runs[arm], key=lambda r: r["stage_s"]) for arm in arms}
    gap = max(abs(x - y) for x, y in zip(best["online"]["losses"], best["precomputed"]["losses"], strict=True))
    import torch
    import transformers

    from spa.models.loading import load_causal_lm

    params = sum(p.numel() for p in load_causal_lm(model, "float32", "cpu").parameters())
    out = {
        "benchmark": "seed stage (3 epochs, plain DPO): reference log-probs computed once vs a reference model every step",
        "command": "python bench/reference_once.py",
        "model": {"hidden": a.hidden, "layers": a.layers, "params": params},
        "pairs": a.pairs - 20, "steps": len(best["online"]["losses"]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "online": {k: v for k, v in best["online"].items() if k != "losses"},
        "precomputed": {k: v for k, v in best["precomputed"].items() if k != "losses"},
        "time_ratio": best["precomputed"]["stage_s"] / best["online"]["stage_s"],
        "peak_rss_ratio": best["precomputed"]["peak_rss_mb"] / best["online"]["peak_rss_mb"],
        "max_loss_gap": gap,
        "this_process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: out[k] for k in ("time_ratio", "peak_rss_ratio", "max_loss_gap")}))


if __name__ == "__main__":
    main()
