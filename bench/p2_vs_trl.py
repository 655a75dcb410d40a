"""P2 (issue: performance): our DPO training step vs TRL's ``DPOTrainer`` on the same model, data, batch,
precision and reference handling. Goal: time <= 1.0x, peak memory <= 1.0x.

Both sides: a Llama-shaped model (the tiny tokenizer with its chat template, hidden 512, 4 layers), a
separate frozen reference copy, fp32 on CPU, micro-batch 8, no gradient accumulation, AdamW, lr 1e-5,
conversational pairs rendered by the same chat template, plain sigmoid DPO (beta 0.1; no refinement on our
side; TRL's bf16 and gradient-checkpointing defaults switched off to match). Each side runs in its own process (peak RSS), 2 warm-up steps, then the mean time of the timed steps
and the real (non-pad) tokens per step. TRL comes from the ``bench`` extra (``pip install '.[bench]'``).

    python bench/p2_vs_trl.py            # writes bench/results/p2_vs_trl.json
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/spa-p2")
PAIRS, BATCH, STEPS, WARMUP = 96, 8, 10, 2
WORDS = "apple banana cherry grape lemon mango orange pear plum red green blue small large sweet sour".split()


def data() -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(PAIRS):
        n1, n2 = rng.randint(5, 60), rng.randint(5, 60)
        out.append({"prompt": f"Question {i}: describe " + " ".join(rng.choices(WORDS, k=rng.randint(3, 20))),
                    "chosen": " ".join(rng.choices(WORDS, k=n1)), "rejected": " ".join(rng.choices(WORDS, k=n2))})
    return out


def model_pair(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.requires_grad_(False)
    return policy, ref


class StepTimer:
    def __init__(self):
        self.times, self.last = [], None

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                timer.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.times.append(time.perf_counter() - timer.last)

        return CB()


def run_ours(path: Path) -> dict:
    from transformers import TrainingArguments

    from spa.models.rendering import load_tokenizer
    from spa.training.pairs import PairCollator, PairDataset
    from spa.training.trainer import RefinedDPOTrainer

    rows = data()
    tok = load_tokenizer(path)
    ds = PairDataset(tok, [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows], 512)
    policy, ref = model_pair(path)
    args = TrainingArguments(output_dir=str(WORK / "ours"), per_device_train_batch_size=BATCH, learning_rate=1e-5,
                             max_steps=WARMUP + STEPS, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1000, disable_tqdm=True, remove_unused_columns=False, seed=0)
    timer = StepTimer()
    tr = RefinedDPOTrainer(model=policy, args=args, train_dataset=ds, data_collator=PairCollator(tok.pad_token_id),
                           ref_model=ref, beta=0.1, refine=None, callbacks=[timer.callback()])
    tr.train()
    tokens = sum(len(c.input_ids) + len(r.input_ids) for c, r in ds.items) / len(ds) * BATCH
    return {"step_s": sum(timer.times[WARMUP:]) / STEPS, "tokens_per_step": tokens}


def run_trl(path: Path) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from spa.models.rendering import load_tokenizer

    rows = data()
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    tok = load_tokenizer(path)
    policy, ref = model_pair(path)
    args = DPOConfig(output_dir=str(WORK / "trl"), per_device_train_batch_size=BATCH, learning_rate=1e-5,
                     max_steps=WARMUP + STEPS, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1000,
                     disable_tqdm=True, beta=0.1, loss_type=["sigmoid"], max_length=512, seed=0,
                     # TRL 1.x defaults to bf16 autocast and gradient checkpointing: the same settings as ours here
                     bf16=False, gradient_checkpointing=False)
    timer = StepTimer()
    tr = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(conv),
                    processing_class=tok, callbacks=[timer.callback()])
    tr.train()
    return {"step_s": sum(timer.times[WARMUP:]) / STEPS}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        side = sys.argv[2]
        res = (run_ours if side == "ours" else run_trl)(WORK / "model")
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    from spa.models.tiny import build_tiny_model

    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "model").exists():
        build_tiny_model(WORK / "model", hidden_size=512, layers=4, heads=8, seed=0)
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for _ in range(2):  # alternate the sides twice; best of each
        for side in ("ours", "trl"):
            out = subprocess.run([sys.executable, __file__, "--child", side], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(side, results[side][-1], flush=True)
    best = {k: {"step_s": min(r["step_s"] for r in v), "peak_rss_mb": min(r["peak_rss_mb"] for r in v)}
            for k, v in results.items()}
    summary = {"time_ratio": best["ours"]["step_s"] / best["trl"]["step_s"],
               "peak_rss_ratio": best["ours"]["peak_rss_mb"] / best["trl"]["peak_rss_mb"],
               "tokens_per_step": results["ours"][0].get("tokens_per_step")}
    print(json.dumps(summary))
    import torch
    import transformers
    import trl

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p2_vs_trl.json").write_text(json.dumps({
        "benchmark": "P2 our DPO step vs TRL DPOTrainer (same model, data, batch, fp32, separate reference)",
        "goal": {"time_ratio": 1.0, "peak_memory_ratio": 1.0},
        "command": "python bench/p2_vs_trl.py",
        "settings": {"pairs": PAIRS, "micro_batch": BATCH, "timed_steps": STEPS, "warmup_steps": WARMUP,
                     "model": "Llama-shaped, tiny tokenizer (vocab 512), hidden 512, 4 layers, fp32"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu"},
        "results": results, "best": best, "summary": summary,
    }, indent=2))


if __name__ == "__main__":
    main()
