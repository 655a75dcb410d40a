"""How often the demo world's pi_init escapes its training plateau, per seed, learning rate and attempt.

The demo trains a 0.4M-parameter pi_init from scratch; some initialisations stay on a loss plateau where topic
membership is never learnt (``spa.demo.run._trained_pi_init`` probes and retries). This bench trains pi_init on
seeds 0-9 with each learning rate, with the same initial states the demo's first two attempts use, and records
the probe's on-topic share of each (success: at least ``SFT_ON_TOPIC_MIN``). Results go to
``bench/results/<name>.json`` after every trial; a rerun skips the trials already recorded.

    python bench/pi_init_first_attempt.py --seeds 0 1 2 3 4 5 6 7 8 9 --learning-rates 3e-3 1e-3

A setting ``RATE:wSHARE`` (``3e-3:w0.25``) also warms the learning rate up over that share of the steps (the
world's: 0.05).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from spa.demo.policy import train_pi_init
from spa.demo.run import SFT_ON_TOPIC_MIN, SFT_PROBE_PROMPTS, WorldSizes, _sampling_spec, pi_init_quality
from spa.demo.world import make_prompts
from spa.models.sampling import TransformersSampler
from spa.run.artifacts import write_text_atomic


def trial(seed: int, attempt: int, setting: str, epochs: int, demos: int) -> dict:
    """Train one pi_init (the demo's attempt ``attempt``: the same initial state) and probe its answers."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        init_seed = seed if attempt == 0 else seed + 1000 * attempt
        rate, _, warmup = setting.partition(":w")
        pi_init = train_pi_init(Path(tmp) / "pi_init", num_demos=demos, epochs=epochs, seed=seed,
                                init_seed=init_seed, learning_rate=float(rate), warmup=float(warmup) if warmup else WorldSizes().sft_warmup)
        sampler = TransformersSampler(pi_init, _sampling_spec(pi_init, "tiny", seed))
        probe = make_prompts(SFT_PROBE_PROMPTS, seed=seed + 2000)
        rows = [{"prompt": p, "chosen": s.responses[0], "rejected": s.responses[1]}
                for p, s in zip(probe, sampler(probe, progress="probe"), strict=True)]
        on_topic = pi_init_quality(rows)["on_topic"]
        shutil.rmtree(Path(tmp), ignore_errors=True)
        return {"on_topic": round(on_topic, 4), "success": on_topic >= SFT_ON_TOPIC_MIN,
                "seconds": round(time.perf_counter() - start, 1)}


def table(results: dict, seeds: list[int], rates: list[str]) -> str:
    lines = ["| learning rate | " + " | ".join(f"seed {s}" for s in seeds) + " | first attempt | within two |",
             "|---|" + "---|" * (len(seeds) + 2)]
    for rate in rates:
        cells, first, two = [], 0, 0
        for s in seeds:
            a0, a1 = results.get(f"{rate}/{s}/0"), results.get(f"{rate}/{s}/1")
            if a0 is None:
                cells.append("-")
                continue
            cell = f"{a0['on_topic']:.2f}"
            first += a0["success"]
            if a0["success"]:
                two += 1
            elif a1 is not None:
                cell += f" / {a1['on_topic']:.2f}"
                two += a1["success"]
            cells.append(cell)
        lines.append(f"| {rate} | " + " | ".join(cells) + f" | {first} | {two} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--learning-rates", nargs="+", default=["3e-3", "1e-3"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (leave cores to other work)")
    parser.add_argument("--name", default="pi_init_first_attempt")
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.results) / f"{args.name}.json"
    results = json.loads(path.read_text())["trials"] if path.exists() else {}
    demos = WorldSizes().sft_demos
    for rate in args.learning_rates:
        for seed in args.seeds:
            for attempt in (0, 1):
                key = f"{rate}/{seed}/{attempt}"
                if attempt == 1 and results.get(f"{rate}/{seed}/0", {}).get("success"):
                    break  # the demo stops at the first success
                if key not in results:
                    results[key] = trial(seed, attempt, rate, args.epochs, demos)
                    print(key, results[key], flush=True)
                    write_text_atomic(path, json.dumps({
                        "benchmark": "pi_init_first_attempt", "epochs": args.epochs, "demos": demos,
                        "success_threshold": SFT_ON_TOPIC_MIN, "threads": args.threads, "trials": results,
                        "table": table(results, args.seeds, args.learning_rates)}, indent=2))
    print(table(results, args.seeds, args.learning_rates))


if __name__ == "__main__":
    main()
