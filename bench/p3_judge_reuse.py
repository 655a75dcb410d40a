"""P3 (issue: performance): the judge reusing the sampler's log-probabilities of pi_{t-1}.

Goal: judge cost with ``judge.policy_logps: from_sampling`` (only the reference model runs) <= 0.55x the
cost of rescoring with both models, and label agreement with full rescoring >= 99% (disagreements listed
with their margins).

Two settings, each sampled once and judged both ways on the same responses file:

- ``demo``: the demo world's trained pi_init and its seed-DPO pi_0 (word-level tokenizer, ~24-token answers):
  realistic labels, but a 0.4M-parameter model, so fixed costs weigh more than on a real model;
- ``wide``: a 31M-parameter Llama shape (hidden 512, 8 layers, 20K-word vocabulary: the world's words plus
  made-up ones), random pi_init, pi_0 = pi_init plus small weight noise, 64 new tokens: compute-bound, the
  share a real model would see.

Each is sampled with the transformers backend and, when ``--vllm-python`` names a vLLM environment (``bash
install.sh --vllm`` makes ``.venv-vllm``), with the real vLLM CPU engine. Timings are the best of 3 runs,
alternating: ``total`` is the whole judge pass (loading models, reading, scoring, writing), ``scoring`` the
model work only (models loaded beforehand).

    python bench/p3_judge_reuse.py [--vllm-python .venv-vllm/bin/python]   # bench/results/p3_judge_reuse.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from spa.config import parse_config  # noqa: E402
from spa.demo.run import WorldSizes, build_world, demo_config  # noqa: E402
from spa.run.layout import RunLayout  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3


def with_judge(cfg, **judge):
    return cfg.model_copy(update={"judge": cfg.judge.model_copy(update=judge)})


def time_judge(cfg, responses: Path, out: Path) -> dict[str, float]:
    """Seconds for the whole judge pass, and for the scoring alone (models already loaded)."""
    from spa.judges.scoring import Judges
    from spa.run.artifacts import iter_chunks
    from spa.stages.judge import judge_file

    stats: dict[str, int] = {}
    start = time.perf_counter()
    judge_file(cfg, 1, responses, out, progress=False, stats=stats)
    total = time.perf_counter() - start
    judges = Judges(cfg, 1)
    start = time.perf_counter()
    for first, rows in iter_chunks(responses, "responses", cfg.judge.chunk_rows):
        judges.score(*judges.inputs(rows, str(responses), first))
    return {"total": total, "scoring": time.perf_counter() - start, **stats}


def compare(full: Path, reused: Path, responses: Path, tok) -> dict:
    """Label agreement of the reusing judge with full rescoring; every disagreement with its margins."""
    from spa.models.rendering import response_ids

    f, r = pq.read_table(full).to_pylist(), pq.read_table(reused).to_pylist()
    resp = pq.read_table(responses, columns=["prompt", "responses", "finish_reasons", "token_ids"]).to_pylist()
    agree, disagreements, gaps, round_trip = 0, [], [], 0
    for a, b, s in zip(f, r, resp, strict=True):
        same = (a["chosen_index"], a["tie"]) == (b["chosen_index"], b["tie"])
        agree += same
        trips = all(response_ids(tok, s["prompt"], y, why == "stop") == ids
                    for y, why, ids in zip(s["responses"], s["finish_reasons"], s["token_ids"], strict=True))
        round_trip += trips
        for side in ("chosen", "rejected"):
            if a[f"policy_logp_{side}"] is not None and a["chosen_index"] == b["chosen_index"]:
                gaps.append(abs(a[f"policy_logp_{side}"] - b[f"policy_logp_{side}"]))
        if not same:
            disagreements.append({"prompt_id": a["prompt_id"], "p_chosen_rescored": a["p_chosen"],
                                  "p_first_reused": b["p_chosen"] if b["first_is_chosen"] else 1 - b["p_chosen"],
                                  "margin_rescored": abs(a["p_chosen"] - 0.5), "ids_round_trip": trips})
    return {"pairs": len(f), "agreement": agree / max(1, len(f)), "disagreements": disagreements,
            "pairs_whose_sampled_ids_round_trip": round_trip,
            "policy_logp_abs_gap": {"max": max(gaps, default=0.0), "mean": float(np.mean(gaps)) if gaps else 0.0}}


def make_wide(world: Path, out: Path) -> tuple[Path, Path]:
    """A 25M-parameter pi_init (random) and pi_0 (pi_init + small noise) over the demo world's tokenizer."""
    from transformers import LlamaForCausalLM

    from spa.demo.policy import world_tokenizer
    from spa.models.tiny import tiny_llama_config

    tok = world_tokenizer(extra_words=20_000)  # a real-sized vocabulary: specials are rarely sampled
    paths = []
    for name, noise in (("pi_init", 0.0), ("pi_0", 0.02)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=512, layers=8, heads=8, max_positions=256,
                                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                                   eos_token_id=tok.eos_token_id))
        if noise:
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * torch.randn(p.shape, generator=gen))
        model.save_pretrained(out / name, safe_serialization=True)
        tok.save_pretrained(out / name)
        paths.append(out / name)
    return paths[0], paths[1]


def setting(name: str, ns, world: Path) -> dict:
    from spa.models.rendering import load_tokenizer
    from spa.stages import prepare, sample, train

    base = ns.out / name
    shutil.rmtree(base, ignore_errors=True)
    prompts = ns.prompts if name == "demo" else ns.wide_prompts
    sizes = WorldSizes(prompts_per_iteration=prompts, iterations=1)
    raw = demo_config(world, base / "run", sizes, iterations=1)
    raw["judge"] |= {"chunk_rows": 256}
    if name == "wide":
        pi_init, pi_0 = make_wide(world, base)
        raw["model"]["pi_init"] = str(pi_init)
        raw["sample"]["max_new_tokens"] = 64
        raw["model"]["max_length"] = 256
        raw["judge"]["batch_size"] = 16  # [16, ~90, 20K] logits per forward
    cfg = parse_config(raw)
    quiet = lambda _m: None  # noqa: E731
    prepare.run(cfg, echo=quiet)
    lay = RunLayout(cfg.run_dir)
    if name == "wide":
        shutil.copytree(pi_0, lay.model(0))
    else:
        train.run(cfg, 0, echo=quiet)
    tok = load_tokenizer(lay.model(0))
    backends = ["transformers"] + (["vllm"] if ns.vllm_python else [])
    results = {}
    for backend in backends:
        s = {"backend": backend, "python": ns.vllm_python if backend == "vllm" else None,
             "gpu_memory_utilization": 0.3}
        cfg_b = cfg.model_copy(update={"sample": cfg.sample.model_copy(update=s)})
        t0 = time.perf_counter()
        sample.run(cfg_b, 1, force=True, echo=quiet)
        sample_s = time.perf_counter() - t0
        responses = base / f"responses_{backend}.parquet"
        shutil.copy(lay.responses(1), responses)
        full_cfg, reuse_cfg = with_judge(cfg_b, policy_logps="rescore"), with_judge(cfg_b, policy_logps="from_sampling")
        times = {"rescore": [], "from_sampling": []}
        for _ in range(REPEATS):
            times["rescore"].append(time_judge(full_cfg, responses, base / f"judged_full_{backend}.parquet"))
            times["from_sampling"].append(time_judge(reuse_cfg, responses, base / f"judged_reuse_{backend}.parquet"))
        best = {mode: {k: min(x[k] for x in runs) for k in ("total", "scoring")} for mode, runs in times.items()}
        rescored = times["from_sampling"][0].get("policy_rescored", 0)
        reused_share = 1 - rescored / max(1, times["from_sampling"][0].get("responses", 1))
        agreement = compare(base / f"judged_full_{backend}.parquet", base / f"judged_reuse_{backend}.parquet",
                            responses, tok)
        results[backend] = {
            "sample_s": round(sample_s, 2),
            "judge_s": best,
            "ratio_total": best["from_sampling"]["total"] / best["rescore"]["total"],
            "ratio_scoring": best["from_sampling"]["scoring"] / best["rescore"]["scoring"],
            "responses_rescored_with_policy": rescored, "share_of_responses_reused": reused_share,
            **agreement,
        }
        print(name, backend, json.dumps({k: v for k, v in results[backend].items() if k != "disagreements"}),
              flush=True)
    return {"prompts": prompts, "max_new_tokens": cfg.sample.max_new_tokens,
            "model": "demo pi_init (0.4M params) / seed-DPO pi_0" if name == "demo"
            else "Llama hidden 512, 8 layers, vocab 20K (31M params), random pi_init, pi_0 = pi_init + N(0, 0.02^2)",
            "backends": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=800, help="prompts of the demo setting")
    parser.add_argument("--wide-prompts", type=int, default=200, help="prompts of the wide setting")
    parser.add_argument("--vllm-python", default=None, help="interpreter of a vLLM environment (.venv-vllm/bin/python)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/spa-p3"))
    ns = parser.parse_args()
    if ns.vllm_python is None and (ROOT / ".venv-vllm" / "bin" / "python").exists():
        ns.vllm_python = str(ROOT / ".venv-vllm" / "bin" / "python")
    world = build_world(ns.out / "world", seed=0, sizes=WorldSizes())
    settings = {name: setting(name, ns, world) for name in ("demo", "wide")}
    import transformers

    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "p3_judge_reuse.json").write_text(json.dumps({
        "benchmark": "P3 judge reusing the sampler's raw log-probs of pi_{t-1} vs rescoring with both models",
        "goal": {"time_ratio": 0.55, "label_agreement": 0.99},
        "command": "python bench/p3_judge_reuse.py" + (" --vllm-python PATH" if ns.vllm_python else ""),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "device": "cpu",
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "repeats": REPEATS,
        "settings": settings,
    }, indent=2))


if __name__ == "__main__":
    main()
