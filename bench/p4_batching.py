"""P4 (issue: performance): length-bucketed (sorted) batches vs naive padded batches on a long-tailed
length distribution, for scoring (no grad, the judge's ``sequence_logps`` path) and for a training
forward+backward. Goal: >= 1.5x real (non-pad) tokens/s.

Sequences: 192 prompt+response lengths drawn from a log-normal (median ~60 tokens, long tail; max 363 at seed 0),
a Llama-shaped model (vocab 512, hidden 256, 2 layers), batch 16. Naive batches take the rows in
their given order; bucketed ones come from ``spa.models.logprobs.length_sorted_batches``.

    python bench/p4_batching.py            # writes bench/results/p4_batching.json
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spa.models.logprobs import Encoded, collate, gather_logps, length_sorted_batches
from spa.models.tiny import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


def run(model, encoded: list[Encoded], batches: list[list[int]], train: bool) -> float:
    """Real tokens per second over all batches."""
    real = sum(len(e.input_ids) for e in encoded)
    start = time.perf_counter()
    for idx in batches:
        batch = collate([encoded[i] for i in idx], 0)
        with torch.set_grad_enabled(train):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            logps = gather_logps(logits, batch["labels"], batch["loss_mask"])
            if train:
                logps.sum().backward()
                model.zero_grad(set_to_none=True)
    return real / (time.perf_counter() - start)


def main() -> None:
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=np.log(60), sigma=0.9, size=192).astype(int), 8, 1000)
    encoded = [Encoded(list(rng.integers(1, 512, n)), n // 3) for n in lengths]
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(512, hidden_size=256, layers=2, heads=4, max_positions=1024,
                                               pad_token_id=0))
    bs = 16
    naive = [list(range(i, min(i + bs, len(encoded)))) for i in range(0, len(encoded), bs)]
    bucketed = length_sorted_batches([len(e.input_ids) for e in encoded], bs)
    pad = lambda batches: sum(max(lengths[i] for i in b) * len(b) for b in batches) / lengths.sum()  # noqa: E731
    results = {}
    for mode, train in (("scoring", False), ("training", True)):
        run(model, encoded, bucketed[:2], train)  # warm-up
        tps = {"naive": [], "bucketed": []}
        for _ in range(2):  # alternate, take the best of each
            tps["naive"].append(run(model, encoded, naive, train))
            tps["bucketed"].append(run(model, encoded, bucketed, train))
        best = {k: max(v) for k, v in tps.items()}
        results[mode] = {"tokens_per_s": best, "speedup": best["bucketed"] / best["naive"]}
        print(mode, json.dumps(results[mode]), flush=True)
    out = {
        "benchmark": "P4 length-bucketed vs naive padded batches (real tokens/s)",
        "goal": {"speedup": 1.5},
        "command": "python bench/p4_batching.py",
        "inputs": {"sequences": len(encoded), "batch_size": bs, "length_median": float(np.median(lengths)),
                   "length_max": int(lengths.max()), "padded_over_real_tokens": {"naive": pad(naive),
                                                                                   "bucketed": pad(bucketed)}},
        "model": "Llama-shaped, vocab 512, hidden 256, 2 layers, fp32",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": results,
        "note": "scoring (judge, gold agreement) uses bucketed batches; the training stage samples pairs in "
                "Trainer's random order (no length grouping yet), i.e. the 'naive' column applies to training",
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p4_batching.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
