"""Sharded training (``train.sharding: fsdp``, FSDP2 through Trainer; spa/training/fsdp.py), for real: 2 gloo
processes on CPU take the same FSDP2 path as GPUs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import kill_after_first_checkpoint, tiny_config
from test_training import _fake_judgments

from spa.models.loading import load_causal_lm
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.stages import prepare, train

SPA = str(Path(sys.executable).parent / "spa")
SR_DND = {"refinement": {"window": 8, "k_percent": 25.0}}  # iteration 1: SR with DND (lambda 0.5) on


def _iteration_one(tmp_path, name, tiny_model_dir, prefs_file, **train_over):
    """A config for iteration 1 (SR + DND: the reference model is loaded) with pi_0 = pi_init and the seed pairs
    judged as they are; the round itself is left to the caller."""
    cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file, train={**SR_DND, **train_over})
    prepare.run(cfg)
    lay = RunLayout(cfg.run_dir)
    _fake_judgments(lay)
    shutil.copytree(cfg.model.pi_init, lay.model(0))
    return cfg, lay


def _weights(path):
    return load_causal_lm(path, "float32", "cpu").state_dict()


def test_two_sharded_processes_match_one(tmp_path, tiny_model_dir, prefs_file, capfd):
    """2-process FSDP (each rank holds half of every parameter, gradient and AdamW moment; activation checkpointing
    on) with SR and DND gives the losses, flags and final weights of 1 process without sharding, to float tolerance
    (1e-5); ``iter_t/model`` is one ordinary safetensors model (the same tensor names) that loads without
    torch.distributed."""
    from safetensors import safe_open

    logs, models = [], []
    for n, sharding in ((1, "none"), (2, "fsdp")):
        cfg, lay = _iteration_one(tmp_path, f"r{n}", tiny_model_dir, prefs_file, num_processes=n,
                                  micro_batch_size=4 // n, sharding=sharding, gradient_checkpointing=n == 2)
        train.run(cfg, 1)
        assert ("FSDP2: weights, gradients and optimiser state sharded over 2 processes" in capfd.readouterr().out) == (n == 2)
        logs.append(read_table(lay.train_log(1), "train_log").to_pylist())
        models.append(lay.model(1))
    assert len(logs[0]) == len(logs[1]) == 4
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["margin_mean"] == pytest.approx(b["margin_mean"], abs=1e-5)
        assert a["refined_fraction"] == b["refined_fraction"]
        assert (a["tau"] is None and b["tau"] is None) or a["tau"] == pytest.approx(b["tau"], abs=1e-5)
    assert abs(logs[1][0]["margin_mean"]) < 1e-6  # the sharded reference is the policy at step 0
    assert any(r["refined_fraction"] > 0 for r in logs[0])
    files = sorted(p.name for p in models[1].iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".distcp"))], files
    assert yaml.safe_load((models[1] / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    names = [sorted(safe_open(str(m / "model.safetensors"), "pt").keys()) for m in models]
    assert names[0] == names[1] and "lm_head.weight" not in names[1]  # the tied embedding once, as unsharded
    a, b = _weights(models[0]), _weights(models[1])
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not all(torch.equal(a[k], _weights(tiny_model_dir)[k]) for k in a)  # it trained


def test_sharded_lora_matches_one_process_and_a_bf16_base_is_never_gathered(tmp_path, tiny_model_dir, prefs_file):
    """FSDP with LoRA (the 70B recipe), SR and DND on (the reference: the same sharded base, adapter disabled).
    With an fp32 base, 2 sharded processes give 1 unsharded process's LoRA round to float tolerance. With a bf16
    frozen base beside fp32 adapters (one FSDP unit, mixed dtypes): margin exactly 0 at step 0 (B = 0), and
    ``iter_t/model`` is the base with the gathered adapter merged: bf16, no adapter names, every weight the adapter
    does not touch bit-identical to the start (only the adapter was gathered and merged)."""
    from safetensors import safe_open

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    runs = {}
    for name, n, base in (("one", 1, "float32"), ("sharded", 2, "float32"), ("bf16", 2, "bfloat16")):
        cfg, lay = _iteration_one(tmp_path, name, tiny_model_dir, prefs_file, num_processes=n, micro_batch_size=4 // n,
                                  sharding="fsdp" if n > 1 else "none", lora={**lora, "base_dtype": base},
                                  learning_rate=1e-2, gradient_checkpointing=name == "bf16")  # the 70B recipe's
        train.run(cfg, 1)
        runs[name] = (read_table(lay.train_log(1), "train_log").to_pylist(), lay.model(1))
    (one, one_dir), (sharded, sharded_dir), (bf16, bf16_dir) = runs["one"], runs["sharded"], runs["bf16"]
    assert len(one) == len(sharded) == len(bf16) == 4
    for a, b in zip(one, sharded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["margin_mean"] == pytest.approx(b["margin_mean"], abs=1e-5)
    a, b = _weights(one_dir), _weights(sharded_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert one[0]["margin_mean"] == sharded[0]["margin_mean"] == bf16[0]["margin_mean"] == 0.0
    assert bf16[-1]["loss"] < bf16[0]["loss"]  # it trains
    with safe_open(str(bf16_dir / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert not [k for k in names if "lora" in k or "base_layer" in k], names
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    start = load_causal_lm(tiny_model_dir, "bfloat16", "cpu").state_dict()
    merged = load_causal_lm(bf16_dir, "bfloat16", "cpu").state_dict()
    touched = [k for k in merged if "q_proj" in k or "v_proj" in k]
    assert touched and all(torch.equal(merged[k], start[k]) for k in merged if k not in touched)
    assert not all(torch.equal(merged[k], start[k]) for k in touched)  # the adapter trained and was merged


# three 2-process launches each (~80 s on 2 cores): the sharded checkpoint (the default) in the default suite
@pytest.mark.parametrize("kind", ["sharded", pytest.param("full", marks=pytest.mark.slow)])
def test_killed_sharded_training_resumes_with_the_same_result(tmp_path, tiny_model_dir, prefs_file, kind):
    """Killed after a checkpoint (sharded: every rank's shards of weights and AdamW state; full: rank 0's gathered
    ones; the scheduler, each rank's RNG, the global refinement window), the resumed round gives exactly the
    uninterrupted round's log and weights."""
    over = {"num_processes": 2, "sharding": "fsdp", "fsdp": {"checkpoint": kind}, "epochs": 5, "save_steps": 3}
    ref_cfg, ref_lay = _iteration_one(tmp_path, "ref", tiny_model_dir, prefs_file, **over)
    train.run(ref_cfg, 1)
    uninterrupted = read_table(ref_lay.train_log(1), "train_log").to_pylist()

    cfg, lay = _iteration_one(tmp_path, "killed", tiny_model_dir, prefs_file, **over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    ckpts = kill_after_first_checkpoint([SPA, "train", "-c", str(path), "-t", "1"], lay.checkpoints(1))
    if kind == "sharded":
        assert list(ckpts[0].glob("pytorch_model_fsdp_0/*.distcp")) and list(ckpts[0].glob("optimizer_0/*.distcp"))
    else:
        assert (ckpts[0] / "pytorch_model_fsdp.bin").exists() and (ckpts[0] / "optimizer.bin").exists()
    assert not lay.model(1).exists()

    res = subprocess.run([SPA, "train", "-c", str(path), "-t", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "[train/1] resuming from checkpoint-" in out
    assert "missing keys" not in out and "unexpected keys" not in out.lower(), out[-3000:]
    resumed = read_table(lay.train_log(1), "train_log").to_pylist()
    assert len(resumed) == len(uninterrupted) == 20
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["refined_fraction"] == b["refined_fraction"]
    a, b = _weights(lay.model(1)), _weights(ref_lay.model(1))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_sharding_config_is_checked(tmp_path, tiny_model_dir, prefs_file):
    from spa.errors import ConfigError

    def cfg(**train_over):
        return tiny_config(tmp_path, tiny_model_dir, prefs_file, train=train_over)

    with pytest.raises((ConfigError, ValueError), match="needs train.num_processes"):
        cfg(sharding="fsdp")
    with pytest.raises((ConfigError, ValueError), match="base_dtype"):
        cfg(lora={"r": 4, "base_dtype": "float16"})
    with pytest.raises((ConfigError, ValueError), match="with train.loss 'spo' is not supported"):
        cfg(sharding="fsdp", num_processes=2, loss="spo")
    with pytest.raises((ConfigError, ValueError), match="sharding"):
        cfg(sharding="zero3", num_processes=2)
    with pytest.raises((ConfigError, ValueError), match="checkpoint"):
        cfg(sharding="fsdp", num_processes=2, fsdp={"checkpoint": "both"})
    plain = cfg()
    # the default is written nowhere: resume keys of runs from before train.sharding existed stay the same
    assert "sharding" not in plain.model_dump()["train"] and "fsdp" not in plain.model_dump()["train"]
    assert cfg(sharding="fsdp", num_processes=2).model_dump()["train"]["sharding"] == "fsdp"


def test_sharded_lora_loads_in_host_memory_and_takes_its_reference_from_the_base(tmp_path, tiny_model_dir, prefs_file):
    """FSDP with LoRA: every rank loads the base on the CPU (fully_shard moves only its shards to its GPU) and no
    reference pass runs before training (it would need the whole base on one device); full fine-tuning under FSDP
    and LoRA without it keep the device load and the pass."""
    from spa.training.rounds import resolve_round
    from spa.training.worker import load_device

    lora = {"r": 4}
    sharded_lora = tiny_config(tmp_path, tiny_model_dir, prefs_file, train={"sharding": "fsdp", "num_processes": 2,
                                                                           "lora": lora})
    assert load_device(sharded_lora) == "cpu" and resolve_round(sharded_lora, 0).precompute_reference is False
    for train_over in ({"sharding": "fsdp", "num_processes": 2}, {"lora": lora}):
        other = tiny_config(tmp_path, tiny_model_dir, prefs_file, train=train_over)
        assert resolve_round(other, 0).precompute_reference is True
        assert load_device(other) == ("cpu" if not torch.cuda.is_available() else "cuda:0")


def test_training_arguments_of_the_sharded_round(tmp_path, tiny_model_dir, prefs_file):
    """FSDP2, the decoder-layer wrap policy, full sharding, the checkpoint kind and FSDP's own activation
    checkpointing for train.gradient_checkpointing (never both: Trainer refuses that)."""
    from spa.training.fsdp import fsdp_arguments, mixed_precision

    base = {"sharding": "fsdp", "num_processes": 2}
    tc = tiny_config(tmp_path, tiny_model_dir, prefs_file, train={**base, "gradient_checkpointing": True}).train
    args = fsdp_arguments(tc)
    assert args["fsdp"] is True
    fc = args["fsdp_config"]
    assert fc["version"] == 2 and fc["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fc["reshard_after_forward"]
    assert fc["state_dict_type"] == "SHARDED_STATE_DICT" and fc["activation_checkpointing"] is True
    full = tiny_config(tmp_path, tiny_model_dir, prefs_file, train={**base, "fsdp": {"checkpoint": "full"}}).train
    assert fsdp_arguments(full)["fsdp_config"]["state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp_arguments(tiny_config(tmp_path, tiny_model_dir, prefs_file).train) == {}
    mp = mixed_precision(True)
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32
    assert mixed_precision(False).param_dtype is None
