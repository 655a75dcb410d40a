"""P7 (issue: performance): GPU throughput of judge scoring and of the refined training step for a
~1B Llama-shaped model in bf16, as model FLOPs utilisation (MFU) of the GPU's dense bf16 peak, and the
extrapolated wall time of one SPA iteration on 10K prompts for a 7B model.
Goal: one iteration of 10K prompts at 7B on one H100 within 1 hour (the paper: 20+ GPU-hours).

The model is built from a config (no download): TinyLlama-1.1B's shape (hidden 2048, 22 layers,
32 heads, 4 KV heads, vocabulary 32000), random weights (speed does not depend on them). Each part runs
our own code path:

- **judge scoring**: ``spa.models.logprobs.encoded_logps`` (length-sorted batches, what the judge stage runs)
  on the bf16 model; forward FLOPs per token ``2N + 4 * layers * hidden * seq`` (PaLM's accounting).
- **training step**: ``spa.training.trainer.RefinedDPOTrainer`` with SR + DND (lambda 1/2) under
  ``Trainer.train`` exactly as ``spa train`` sets it up on a GPU: fp32 policy with bf16 autocast, bf16
  reference, AdamW, one optimiser step = 32 pairs (micro-batch 8, accumulation 4). FLOPs per token of
  a pair sequence: policy forward + backward ``6N + 12 * layers * hidden * seq``, reference forward
  ``2N + 4 * layers * hidden * seq``.
- **decoding**: ``model.generate`` (T 0.7, exactly ``--new-tokens`` tokens) at ``--decode-batch``:
  the device has no vLLM, so this is transformers' generate, an upper bound on vLLM's time.

The 7B extrapolation (Llama-2-7B's shape) applies the measured MFUs to the 7B FLOPs of each stage and
brackets sampling between the HBM-bandwidth roofline (lower bound) and the measured 1B decode step scaled
by the parameter ratio (upper bound: it scales launch overhead too).

    python bench/p7_gpu.py                 # on a GPU; writes bench/results/p7_gpu.json
    python bench/p7_gpu.py --smoke         # CPU, tiny model, a few steps: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# dense bf16 tensor-core peaks (no sparsity), FLOP/s, and HBM bandwidth, bytes/s, from the vendor sheets
GPU_PEAKS = {
    "H200": (989e12, 4.8e12),
    "H100 PCIe": (756e12, 2.0e12),
    "H100 NVL": (835e12, 3.9e12),
    "H100": (989e12, 3.35e12),  # SXM; matched after the more specific names above
    "A100": (312e12, 2.0e12),
    "L40S": (362e12, 0.864e12),
    "A10G": (70e12, 0.6e12),
}

SHAPES = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "1b": (2048, 22, 32, 4, 5632, 32000),      # TinyLlama-1.1B
    "7b": (4096, 32, 32, 32, 11008, 32000),    # Llama-2-7B
    "smoke": (64, 2, 4, 2, 128, 512),
}


def param_count(shape: tuple[int, ...]) -> int:
    """Parameters of a Llama with untied embeddings (what ``LlamaForCausalLM`` builds from ``shape``)."""
    hidden, layers, heads, kv, inter, vocab = shape
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv * head_dim * 2
    mlp = 3 * hidden * inter
    return layers * (attn + mlp + 2 * hidden) + 2 * vocab * hidden + hidden


def matmul_params(shape: tuple[int, ...]) -> int:
    """Parameters that take part in matmuls (all but the embedding lookup and the norms)."""
    hidden, layers, heads, kv, inter, vocab = shape
    return param_count(shape) - vocab * hidden - (2 * layers + 1) * hidden


def forward_flops_per_token(shape: tuple[int, ...], seq: float) -> float:
    """``2N + 4 * layers * hidden * seq`` (PaLM, appendix B; attention counted without the causal half)."""
    hidden, layers = shape[0], shape[1]
    return 2 * matmul_params(shape) + 4 * layers * hidden * seq


def gpu_peaks(name: str) -> tuple[float | None, float | None]:
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks
    return None, None


def build_model(shape: tuple[int, ...], device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=2048,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.eval()
    return model


def random_pairs(n: int, prompt_len: int, response_len: int, vocab: int, seed: int):
    """``n`` Encoded sequences: prompt of ``prompt_len``, response of 50-100% of ``response_len`` tokens."""
    import torch

    from spa.models.logprobs import Encoded

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        r = int(torch.randint(response_len // 2, response_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (prompt_len + r,), generator=g).tolist()
        out.append(Encoded(ids, prompt_len))
    return out


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_scoring(shape, device, dtype, n, prompt_len, response_len, batch) -> dict:
    import torch

    from spa.models.logprobs import encoded_logps

    model = build_model(shape, device, dtype)
    warm = random_pairs(batch, prompt_len, response_len, shape[5], seed=1)
    encoded_logps(model, warm, 0, batch)
    seqs = random_pairs(n, prompt_len, response_len, shape[5], seed=2)
    sync(device)
    start = time.perf_counter()
    encoded_logps(model, seqs, 0, batch)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(e.input_ids) for e in seqs)
    mean_len = tokens / n
    flops = tokens * forward_flops_per_token(shape, mean_len)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    del model
    return {"sequences": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "achieved_flops": flops / seconds, "mean_seq_len": mean_len, "batch": batch, "peak_gib": peak}


def measure_training(shape, device, n_steps, warm_steps, prompt_len, response_len, micro, accum) -> dict:
    import torch
    from torch.utils.data import Dataset
    from transformers import TrainerCallback, TrainingArguments

    from spa.config import RefinementConfig
    from spa.training.pairs import PairCollator, disable_dropout
    from spa.training.rounds import RefineSettings
    from spa.training.trainer import RefinedDPOTrainer

    cuda = device.startswith("cuda")
    pairs = (warm_steps + n_steps) * micro * accum
    chosen = random_pairs(pairs, prompt_len, response_len, shape[5], seed=3)
    rejected = random_pairs(pairs, prompt_len, response_len, shape[5], seed=4)
    rejected = [type(r)(c.input_ids[:prompt_len] + r.input_ids[prompt_len:], prompt_len) for c, r in zip(chosen, rejected, strict=True)]

    class Pairs(Dataset):
        def __len__(self):
            return pairs

        def __getitem__(self, i):
            return {"chosen": chosen[i], "rejected": rejected[i], "row": i}

    policy = build_model(shape, device, torch.float32)
    ref = build_model(shape, device, torch.bfloat16 if cuda else torch.float32)
    ref.load_state_dict(policy.state_dict())
    for m in (policy, ref):
        disable_dropout(m)
    ref.requires_grad_(False)
    policy.train()

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            stamps.append(time.perf_counter())

    args = TrainingArguments(
        output_dir="/tmp/spa-p7", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        learning_rate=5e-7, max_steps=warm_steps + n_steps, lr_scheduler_type="cosine", warmup_steps=0.1,
        optim="adamw_torch", logging_steps=10**6, save_strategy="no", report_to=[], bf16=cuda,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not cuda, disable_tqdm=True, seed=0,
    )
    trainer = RefinedDPOTrainer(model=policy, args=args, train_dataset=Pairs(), data_collator=PairCollator(0),
                                ref_model=ref, beta=0.1, refine=RefineSettings.from_config(RefinementConfig(), lam=0.5), callbacks=[Clock()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    times = [b - a for a, b in zip(stamps[warm_steps - 1:-1], stamps[warm_steps:], strict=True)]
    step_s = sorted(times)[len(times) // 2]
    # tokens of one optimiser step: every pair sequence as the collator pads it (per micro-batch)
    tokens = 0
    flops = 0.0
    for k in range(0, pairs, micro):
        lens = [len(s.input_ids) for s in chosen[k:k + micro] + rejected[k:k + micro]]
        real = sum(lens)
        tokens += real
        mean = real / len(lens)
        flops += real * (forward_flops_per_token(shape, mean) * 3 + forward_flops_per_token(shape, mean))
    per_step_tokens = tokens / (warm_steps + n_steps)
    per_step_flops = flops / (warm_steps + n_steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del trainer, policy, ref
    return {"pairs_per_step": micro * accum, "micro_batch": micro, "accumulation": accum, "step_s": step_s,
            "steps_timed": len(times), "tokens_per_step": per_step_tokens, "tokens_per_s": per_step_tokens / step_s,
            "achieved_flops": per_step_flops / step_s, "peak_gib": peak,
            "flops_per_token_note": "policy fwd+bwd (3x forward) + reference forward; SR+DND extra not counted"}


def measure_decode(shape, device, dtype, batch, prompt_len, new_tokens) -> dict:
    import torch

    model = build_model(shape, device, dtype)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, shape[5], (batch, prompt_len), generator=g).to(device)
    kwargs = dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0, min_new_tokens=new_tokens,
                  max_new_tokens=new_tokens, pad_token_id=0)
    model.generate(ids[:, :8], **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - prompt_len) * batch
    del model
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_s": generated / seconds, "step_s": seconds / new_tokens, "backend": "transformers generate"}


def extrapolate_7b(mfu_score: float, mfu_train: float, decode_step_1b_s: float, decode_batch: int, peak_flops: float,
                   bandwidth: float, prompts: int, prompt_len: int, response_len: int) -> dict:
    """Wall time of one SPA iteration on ``prompts`` prompts for Llama-2-7B's shape at the measured MFUs."""
    shape7, shape1 = SHAPES["7b"], SHAPES["1b"]
    n7 = param_count(shape7)
    seqs = 2 * prompts  # two responses per prompt
    seq = prompt_len + response_len
    tokens = seqs * seq
    # sampling: bandwidth roofline (weights + KV cache read per decode step) and the scaled 1B measurement
    hidden, layers, heads, kv = shape7[:4]
    kv_bytes_per_token = 2 * layers * kv * (hidden // heads) * 2
    mean_ctx = prompt_len + response_len / 2
    steps = -(-seqs // decode_batch) * response_len
    step_bytes = 2 * n7 + decode_batch * mean_ctx * kv_bytes_per_token
    sample_lo = steps * step_bytes / bandwidth
    sample_hi = steps * decode_step_1b_s * n7 / param_count(shape1)
    judge_flops = tokens * forward_flops_per_token(shape7, seq)  # reference only (judge.policy_logps: from_sampling)
    judge_s = judge_flops / (mfu_score * peak_flops)
    judge_full_s = 2 * judge_s
    train_full_flops = tokens * 4 * forward_flops_per_token(shape7, seq)
    # LoRA: no weight gradients of the base (backward ~ 1 forward), the reference is the base's forward
    train_lora_flops = tokens * 3 * forward_flops_per_token(shape7, seq)
    train_full_s = train_full_flops / (mfu_train * peak_flops)
    train_lora_s = train_lora_flops / (mfu_train * peak_flops)
    eval_s = (805 * 300 / decode_batch) * step_bytes / bandwidth  # AlpacaEval answers; the annotator not counted
    best = min(sample_lo, sample_hi) + judge_s + train_lora_s + eval_s
    worst = max(sample_lo, sample_hi) + judge_s + train_full_s + eval_s
    return {
        "model": "Llama-2-7B shape", "params": n7, "prompts": prompts, "sequences": seqs, "tokens": tokens,
        "sample_s": {"hbm_roofline": sample_lo, "scaled_1b_generate": sample_hi}, "judge_reuse_s": judge_s,
        "judge_rescore_both_s": judge_full_s, "train_full_s": train_full_s, "train_lora_s": train_lora_s,
        "evaluate_decode_s": eval_s, "iteration_s": {"best": best, "worst": worst},
        "memory_note": "full fine-tuning of 7B does not fit one 80 GB GPU (fp32 weights + grads + AdamW = 16 B/param "
                       "= 108 GB before activations): on one H100 use train.lora (the best case) or shard the optimiser "
                       "over more GPUs (the worst case's FLOPs)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, few steps: checks the script only")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--response-len", type=int, default=300)
    ap.add_argument("--score-sequences", type=int, default=512)
    ap.add_argument("--score-batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--decode-batch", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak when the GPU is not in the table")
    ap.add_argument("--bandwidth-tbs", type=float, default=None, help="HBM bandwidth when the GPU is not in the table")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "p7_gpu.json")
    a = ap.parse_args()

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.smoke:
        device, shape_name, dtype = "cpu", "smoke", torch.float32
        a.prompt_len, a.response_len, a.score_sequences, a.score_batch = 8, 16, 8, 4
        a.train_steps, a.micro_batch, a.decode_batch = 2, 2, 4
        name, peak, bw = "cpu (smoke run: numbers mean nothing)", 1e12, 1e11
    else:
        if not torch.cuda.is_available():
            raise SystemExit("P7 needs a CUDA GPU (use --smoke to check the script on CPU)")
        device, shape_name, dtype = "cuda", "1b", torch.bfloat16
        name = torch.cuda.get_device_name()
        peak, bw = gpu_peaks(name)
        peak = a.peak_tflops * 1e12 if a.peak_tflops else peak
        bw = a.bandwidth_tbs * 1e12 if a.bandwidth_tbs else bw
        if peak is None or bw is None:
            raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops and --bandwidth-tbs (dense bf16, HBM)")
    shape = SHAPES[shape_name]
    accum = max(1, 32 // a.micro_batch)
    print(f"P7 on {name}: {shape_name} model, {param_count(shape) / 1e9:.2f}B parameters", flush=True)
    scoring = measure_scoring(shape, device, dtype, a.score_sequences, a.prompt_len, a.response_len, a.score_batch)
    scoring["mfu"] = scoring["achieved_flops"] / peak
    print("scoring", json.dumps(scoring), flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    training = measure_training(shape, device, a.train_steps, 2, a.prompt_len, a.response_len, a.micro_batch, accum)
    training["mfu"] = training["achieved_flops"] / peak
    print("training", json.dumps(training), flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    decode = measure_decode(shape, device, dtype, a.decode_batch, a.prompt_len, a.response_len)
    print("decode", json.dumps(decode), flush=True)
    est = extrapolate_7b(scoring["mfu"], training["mfu"], decode["step_s"], a.decode_batch, peak, bw, 10_000,
                         a.prompt_len, a.response_len)
    est["goal_met"] = {k: v <= 3600 for k, v in est["iteration_s"].items()}
    print("7b", json.dumps(est), flush=True)
    import transformers

    out = {
        "benchmark": "P7 GPU: judge scoring and refined training step of a ~1B Llama in bf16 (MFU), "
                     "extrapolated 7B SPA iteration on 10K prompts",
        "goal": {"iteration_7b_10k_prompts_s": 3600},
        "command": "python bench/p7_gpu.py" + (" --smoke" if a.smoke else ""),
        "smoke": a.smoke,
        "device": name, "peak_flops": peak, "hbm_bandwidth": bw,
        "model": {"shape": shape_name, "params": param_count(shape), "matmul_params": matmul_params(shape)},
        "lengths": {"prompt": a.prompt_len, "response_max": a.response_len},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "cuda": torch.version.cuda},
        "scoring": scoring, "training": training, "decode": decode, "extrapolated_7b": est,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
