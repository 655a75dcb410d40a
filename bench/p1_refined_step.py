"""P1 (issue: performance): one refined training step (SR + DND, chunked extrapolated log-probs) vs a
plain DPO step on the same batch and model. Goal: time <= 1.10x, peak memory <= 1.05x.

Each (vocabulary, sequence length, arm) runs in its own process: a Llama-shaped model (hidden 256,
2 layers) and its reference, a batch of 2 pairs, ``RefinedDPOTrainer.compute_loss`` + backward (our
training code path, past the refinement warm-up so that the flags are computed), 3 warm-up steps,
then the median of the timed steps. Memory: peak RSS of the process during the steps minus its RSS
before them (CPU; on a GPU this would be ``torch.cuda.max_memory_allocated``).

    python bench/p1_refined_step.py            # writes bench/results/p1_refined_step.json
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [(512, 128), (512, 512), (49152, 128), (49152, 512)]  # tiny vocabulary, SmolLM2's 49K
ARMS = ("dpo", "sr_dnd")


def worker(vocab: int, seq: int, arm: str, steps: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM, TrainingArguments

    from spa.config import RefinementConfig
    from spa.models.tiny import tiny_llama_config
    from spa.training.rounds import RefineSettings
    from spa.training.trainer import RefinedDPOTrainer

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab, hidden_size=256, layers=2, heads=4, max_positions=max(1024, seq), pad_token_id=0)
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref.load_state_dict(policy.state_dict())
    ref.requires_grad_(False)
    pairs = 2
    ids = torch.randint(1, vocab, (2 * pairs, seq))
    mask = torch.zeros(2 * pairs, seq - 1, dtype=torch.bool)
    mask[:, seq // 4:] = True  # the response is the last 3/4 of each sequence
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_ids": ids[:, 1:],
              "loss_mask": mask, "row_ids": torch.arange(pairs)}
    refine = RefineSettings.from_config(RefinementConfig(), lam=0.5) if arm == "sr_dnd" else None
    args = TrainingArguments(output_dir="/tmp/spa-p1", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = RefinedDPOTrainer(model=policy, args=args, ref_model=ref, beta=0.1, refine=refine)
    trainer.state.max_steps = 100
    trainer.state.global_step = 50  # past the 20% warm-up: flags are computed from the window
    times = []
    for k in range(3 + steps):
        if k == 3:
            before = _rss_mb()
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        loss = trainer.compute_loss(policy, inputs)
        loss.backward()
        policy.zero_grad(set_to_none=True)
        if k >= 3:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_rss_mb": peak,
            "step_rss_growth_mb": max(0.0, peak - max(before, peak_before))}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        vocab, seq, arm, steps = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        print(json.dumps(worker(vocab, seq, arm, steps)))
        return
    steps = 5
    results = []
    for vocab, seq in CASES:
        row = {"vocab": vocab, "seq_len": seq}
        for _rep in range(2):  # arms alternate, twice: drift on a shared machine hits both
            for arm in ARMS:
                out = subprocess.run([sys.executable, __file__, "--worker", str(vocab), str(seq), arm, str(steps)],
                                     capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                res = json.loads(out.stdout.strip().splitlines()[-1])
                row.setdefault(arm, []).append(res)
        for arm in ARMS:
            runs = row[arm]
            row[arm] = {"median_s": min(r["median_s"] for r in runs), "peak_rss_mb": min(r["peak_rss_mb"] for r in runs),
                        "step_rss_growth_mb": min(r["step_rss_growth_mb"] for r in runs)}
        row["time_ratio"] = row["sr_dnd"]["median_s"] / row["dpo"]["median_s"]
        row["peak_rss_ratio"] = row["sr_dnd"]["peak_rss_mb"] / row["dpo"]["peak_rss_mb"]
        print(json.dumps(row), flush=True)
        results.append(row)
    import torch

    out = {
        "benchmark": "P1 refined step (SR + DND) vs plain DPO step, same batch and model",
        "goal": {"time_ratio": 1.10, "peak_memory_ratio": 1.05},
        "command": "python bench/p1_refined_step.py",
        "model": "Llama-shaped, hidden 256, 2 layers, 4 heads; 2 pairs per step; response = last 3/4 of the sequence",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": results,
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p1_refined_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
