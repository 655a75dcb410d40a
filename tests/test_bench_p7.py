"""P7's GPU benchmark cannot run here (no GPU); its FLOP accounting and its script can."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_module

ROOT = Path(__file__).resolve().parents[1]


def _p7():
    return bench_module("p7_gpu")


def test_parameter_count_matches_the_built_model():
    p7 = _p7()
    model = p7.build_model(p7.SHAPES["smoke"], "cpu", __import__("torch").float32)
    assert p7.param_count(p7.SHAPES["smoke"]) == sum(p.numel() for p in model.parameters())
    # the published sizes of the two shapes the benchmark names
    assert p7.param_count(p7.SHAPES["7b"]) == 6_738_415_616  # Llama-2-7B
    assert p7.param_count(p7.SHAPES["1b"]) == 1_100_048_384  # TinyLlama-1.1B


def test_forward_flops_by_hand():
    p7 = _p7()
    shape = (4, 1, 2, 2, 8, 10)  # hidden 4, 1 layer, vocab 10
    # matmul params: q,k,v,o 4*16 + mlp 3*32 + lm_head 40 = 200; attention 4 * 1 * 4 * seq
    assert p7.matmul_params(shape) == 200
    assert p7.forward_flops_per_token(shape, 3) == 2 * 200 + 4 * 1 * 4 * 3


def test_gpu_table_prefers_the_specific_name():
    p7 = _p7()
    assert p7.gpu_peaks("NVIDIA H100 PCIe")[0] == 756e12
    assert p7.gpu_peaks("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert p7.gpu_peaks("NVIDIA H200")[1] == 4.8e12
    assert p7.gpu_peaks("Some Other GPU") == (None, None)


def test_extrapolation_scales_with_mfu():
    p7 = _p7()
    a = p7.extrapolate_7b(0.5, 0.4, 0.05, 128, 989e12, 3.35e12, 10_000, 128, 300)
    b = p7.extrapolate_7b(0.25, 0.2, 0.05, 128, 989e12, 3.35e12, 10_000, 128, 300)
    assert b["judge_reuse_s"] == pytest.approx(2 * a["judge_reuse_s"])
    assert b["train_full_s"] == pytest.approx(2 * a["train_full_s"])
    assert a["train_full_s"] == pytest.approx(a["train_lora_s"] * 4 / 3)
    assert a["iteration_s"]["best"] < a["iteration_s"]["worst"]


def test_smoke_run_writes_the_result(tmp_path):
    out = tmp_path / "p7.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "p7_gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["smoke"] is True
    assert res["scoring"]["tokens"] > 0 and res["scoring"]["tokens_per_s"] > 0
    assert res["training"]["steps_timed"] == 2 and res["training"]["pairs_per_step"] == 32
    assert res["decode"]["new_tokens"] == 16
    assert set(res["extrapolated_7b"]["iteration_s"]) == {"best", "worst"}
