"""SSPO's training step against a DPO step on the same sequences and model (the SSPO issue's target: time and
memory within 1.1x of DPO's; SSPO has no reference model, so it should cost less).

Each (vocabulary, sequence length, arm) runs in its own process: a Llama-shaped model (hidden 256, 2 layers), a
micro-batch of 4 sequences, ``RefinedDPOTrainer.compute_loss`` + backward (our training code path), 3 warm-up
steps, then the median of the timed steps. The arms:

- ``dpo_reference_model``: 2 pairs, the reference's log-probs from a second model in memory (DPO with DND's
  logits, or ``train.precompute_reference: false``);
- ``dpo_precomputed``: 2 pairs, the reference's log-probs computed once before training (the seed stage's
  default): one forward pass a step, as SSPO;
- ``sspo``: 1 gold pair and 2 unpaired responses (the same 4 sequences), SimPO's reward, the threshold and the
  pseudo-labels; the statistics and threshold move once a step (``_finish_unpaired_step``, timed with the step).

Memory: peak RSS of the process (CPU). Arms alternate, twice, and the faster of the two runs counts.

    python bench/sspo_step_cost.py            # writes bench/results/sspo_step_cost.json
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
ARMS = ("dpo_reference_model", "dpo_precomputed", "sspo")


class _Counts:
    """What the SSPO trainer reads of its training set: the gold pairs' share (the curriculum's floor)."""

    n_pairs = 300

    def __len__(self) -> int:
        return 1500


def worker(vocab: int, seq: int, arm: str, steps: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM, TrainingArguments

    from spa.config import LossKind
    from spa.models.tiny import tiny_llama_config
    from spa.training.rounds import LossSettings
    from spa.training.trainer import RefinedDPOTrainer

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab, hidden_size=256, layers=2, heads=4, max_positions=max(1024, seq), pad_token_id=0)
    policy = LlamaForCausalLM(cfg)
    ref = None
    if arm == "dpo_reference_model":
        ref = LlamaForCausalLM(cfg)
        ref.load_state_dict(policy.state_dict())
        ref.requires_grad_(False)
    ids = torch.randint(1, vocab, (4, seq))
    mask = torch.zeros(4, seq - 1, dtype=torch.bool)
    mask[:, seq // 4:] = True  # the response is the last 3/4 of each sequence
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_ids": ids[:, 1:], "loss_mask": mask}
    if arm == "sspo":
        inputs |= {"row_ids": torch.arange(1), "pair_count": torch.tensor(1), "unpaired_rows": torch.arange(2)}
        loss = LossSettings(LossKind.SSPO)
    else:
        inputs |= {"row_ids": torch.arange(2)}
        loss = LossSettings(LossKind.DPO)
        if arm == "dpo_precomputed":
            inputs["ref_logps"] = torch.full((4,), -100.0)
    args = TrainingArguments(output_dir="/tmp/spa-sspo-cost", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = RefinedDPOTrainer(model=policy, args=args, ref_model=ref, beta=0.1, refine=None, loss=loss,
                                train_dataset=_Counts())
    trainer.state.max_steps = 100
    times = []
    for k in range(3 + steps):
        if k == 3:
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        out = trainer.compute_loss(policy, inputs)
        out.backward()
        policy.zero_grad(set_to_none=True)
        if arm == "sspo":  # the once-a-step statistics and threshold update
            trainer._finish_unpaired_step({"step": k + 1})
        if k >= 3:
            times.append(time.perf_counter() - start)
        trainer.state.global_step = k + 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_rss_mb": peak, "peak_rss_before_steps_mb": peak_before}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        vocab, seq, arm, steps = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
        print(json.dumps(worker(vocab, seq, arm, steps)))
        return
    steps = 5
    results = []
    for vocab, seq in CASES:
        row: dict = {"vocab": vocab, "seq_len": seq}
        for _rep in range(2):  # arms alternate, twice: drift on a shared machine hits all of them
            for arm in ARMS:
                out = subprocess.run([sys.executable, __file__, "--worker", str(vocab), str(seq), arm, str(steps)],
                                     capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                row.setdefault(arm, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        for arm in ARMS:
            runs = row[arm]
            row[arm] = {k: min(r[k] for r in runs) for k in runs[0]}
        for base in ("dpo_reference_model", "dpo_precomputed"):
            row[f"time_ratio_vs_{base}"] = row["sspo"]["median_s"] / row[base]["median_s"]
            row[f"peak_rss_ratio_vs_{base}"] = row["sspo"]["peak_rss_mb"] / row[base]["peak_rss_mb"]
        print(json.dumps(row), flush=True)
        results.append(row)
    import torch

    out = {
        "benchmark": "SSPO step vs DPO step (reference model / reference log-probs precomputed), same 4 sequences",
        "goal": {"time_ratio": 1.10, "peak_memory_ratio": 1.10},
        "command": "python bench/sspo_step_cost.py",
        "model": "Llama-shaped, hidden 256, 2 layers, 4 heads; 4 sequences a step (DPO: 2 pairs; SSPO: 1 pair + 2 "
                 "unpaired); response = last 3/4 of the sequence",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__},
        "results": results,
    }
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "sspo_step_cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
