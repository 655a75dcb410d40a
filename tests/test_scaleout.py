"""Scale-out (docs/scale_out.md): sampling engines over several GPUs and shards pinned to their own GPUs (the
plumbing: no GPU here), and multi-node training, run as two "nodes" on 127.0.0.1 with a c10d rendezvous."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from spa.config import ModelConfig, SampleConfig, parse_config
from spa.errors import BackendUnavailable, ConfigError
from spa.models.loading import load_causal_lm
from spa.models.sampling import SamplingSpec, engine_kwargs, make_sampler
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest
from spa.run.sharding import shard_devices, visible_devices
from spa.stages import prepare, train
from spa.training.worker import node_rank, torchrun_command

SPA = str(Path(sys.executable).parent / "spa")


def _cfg(tmp_path, **train_over):
    return tiny_config(tmp_path / "run", tmp_path / "model", tmp_path / "prefs.jsonl", train=train_over)


# --- sampling: tensor/pipeline parallel engines, shards on their own GPUs ---

def test_engine_kwargs_carry_the_parallel_sizes():
    sample = SampleConfig(backend="vllm", tensor_parallel_size=4, pipeline_parallel_size=2)
    spec = SamplingSpec.from_config(sample, ModelConfig(pi_init="m", max_length=512))
    kwargs = engine_kwargs("models/m", spec)
    assert (kwargs["tensor_parallel_size"], kwargs["pipeline_parallel_size"]) == (4, 2)
    assert kwargs["model"] == kwargs["tokenizer"] == "models/m" and kwargs["max_model_len"] == 512
    assert kwargs["generation_config"] == "vllm" and kwargs["logprobs_mode"] == "raw_logprobs"
    assert kwargs.get("enforce_eager", False) is not torch.cuda.is_available()  # no graph compilation on CPU
    assert sample.gpus_per_engine == 8
    one = engine_kwargs("m", SamplingSpec.from_config(SampleConfig(), ModelConfig(pi_init="m")))
    assert (one["tensor_parallel_size"], one["pipeline_parallel_size"]) == (1, 1)


def test_parallel_sizes_need_vllm(tmp_path):
    with pytest.raises(ConfigError, match=r"only the vllm backend splits a model over GPUs") as err:
        parse_config({"run_dir": str(tmp_path), "model": {"pi_init": "m"},
                      "sample": {"backend": "transformers", "tensor_parallel_size": 2}})
    assert "\n" not in str(err.value)
    # auto that resolves to transformers (no GPU here) refuses before loading anything
    spec = SamplingSpec.from_config(SampleConfig(tensor_parallel_size=2), ModelConfig(pi_init="m"))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match=r"needs the vllm backend"):
            make_sampler("auto", tmp_path / "missing", spec)


def test_unset_parallel_sizes_keep_the_sample_resume_key(tmp_path):
    raw = {"run_dir": str(tmp_path), "model": {"pi_init": "m"}}
    before = parse_config(raw)
    assert "tensor_parallel_size" not in before.model_dump()["sample"]  # older resume keys stay the same
    assert before.section_hash("sample") == parse_config({**raw, "sample": {"tensor_parallel_size": 1}}).section_hash(
        "sample")
    assert before.section_hash("sample") != parse_config({**raw, "sample": {"tensor_parallel_size": 2}}).section_hash(
        "sample")


def test_each_shard_gets_its_own_group_of_gpus():
    eight = [str(i) for i in range(8)]
    assert [shard_devices(i, 2, eight) for i in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert [shard_devices(i, 1, ["4", "6"]) for i in range(3)] == ["4", "6", "4"]  # more shards than GPUs: in turn
    assert shard_devices(1, 4, eight) == "4,5,6,7"
    with pytest.raises(ValueError, match="one engine needs 8 GPUs"):
        shard_devices(0, 8, eight[:4])
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]  # CUDA stops at the first invalid entry
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "GPU-a1,GPU-b2"}) == ["GPU-a1", "GPU-b2"]


def test_a_shard_process_sees_only_its_gpus():
    from spa_tasks.stage_tasks import shard_env

    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "PATH": "/bin"}
    assert shard_env("1/2", 2, env) == {"CUDA_VISIBLE_DEVICES": "6,7", "PATH": "/bin"}  # within the user's set
    assert shard_env(None, 2, env) is None  # unsharded: inherits everything
    assert shard_env("0/2", 1, {"CUDA_VISIBLE_DEVICES": ""}) is None  # no GPU: nothing to pin
    assert shard_env("1/4", 1, {"CUDA_VISIBLE_DEVICES": "3"})["CUDA_VISIBLE_DEVICES"] == "3"  # never wider


def test_the_sample_and_judge_tasks_start_each_shard_on_its_gpus(tmp_path, monkeypatch):
    import spa_tasks.stage_tasks as st

    cfg = parse_config({"run_dir": str(tmp_path / "run"), "model": {"pi_init": "m"},
                        "sample": {"backend": "vllm", "tensor_parallel_size": 2}})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    started = []
    monkeypatch.setattr(st, "run_command", lambda cmd, config, env=None: started.append((cmd[3:], env)))
    monkeypatch.setattr(st, "stage_record", lambda config, key: {"stage": key})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    st.sample.fn(str(path), 1, "1/2")
    st.judge.fn(str(path), 1, "1/2")
    st.sample.fn(str(path), 1)
    assert started[0][0][-2:] == ["--shard", "1/2"] and started[0][1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert started[1][1]["CUDA_VISIBLE_DEVICES"] == "1"  # a judge shard: one GPU
    assert started[2][1] is None  # unsharded: the flow's own environment


# --- multi-node training ---

def test_nodes_config_and_batch_arithmetic(tmp_path):
    with pytest.raises(ConfigError, match=r"train.nnodes 2 needs train.rdzv_endpoint"):
        _cfg(tmp_path, nnodes=2)
    with pytest.raises(ConfigError, match=r"multiple of micro_batch_size x num_processes x nnodes \(2 x 2 x 2\)"):
        _cfg(tmp_path, nnodes=2, num_processes=2, rdzv_endpoint="head:29500", batch_size=4)
    cfg = _cfg(tmp_path, nnodes=2, num_processes=2, rdzv_endpoint="head:29500", batch_size=16)
    assert (cfg.train.world_size, cfg.train.gradient_accumulation_steps) == (4, 2)
    # where the nodes meet changes with each job: not part of any resume key
    other = _cfg(tmp_path, nnodes=2, num_processes=2, rdzv_endpoint="other:1234", rdzv_id="job7", batch_size=16)
    assert cfg.section_hash("model", "train") == other.section_hash("model", "train")
    assert "nnodes" not in _cfg(tmp_path).model_dump()["train"]  # one node: the keys of before


def test_node_rank_comes_from_the_environment(tmp_path):
    cfg = _cfg(tmp_path, nnodes=4, rdzv_endpoint="head:29500", batch_size=8, micro_batch_size=1)
    assert node_rank(cfg, {"NODE_RANK": "2"}) == 2
    assert node_rank(cfg, {"SLURM_NODEID": "3"}) == 3
    assert node_rank(cfg, {"NODE_RANK": "1", "SLURM_NODEID": "3"}) == 1  # ours first
    with pytest.raises(ConfigError, match=r"node's rank is not set: set NODE_RANK \(0..3"):
        node_rank(cfg, {})
    with pytest.raises(ConfigError, match=r"SLURM_NODEID=4: a node rank must be 0..3"):
        node_rank(cfg, {"SLURM_NODEID": "4"})
    assert node_rank(_cfg(tmp_path), {}) == 0


def test_torchrun_command(tmp_path):
    one = torchrun_command(_cfg(tmp_path, num_processes=2), 1, "key", Path("c.yaml"))
    assert "--standalone" in one and "--nproc_per_node=2" in one and not any("rdzv" in a for a in one)
    cfg = _cfg(tmp_path, nnodes=2, rdzv_endpoint="node-a:29500")
    cmd = torchrun_command(cfg, 3, "key", Path("c.yaml"))
    assert "--standalone" not in cmd
    assert {"--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", "--rdzv_endpoint=node-a:29500"} <= set(cmd)
    rdzv = next(a for a in cmd if a.startswith("--rdzv_id="))
    assert rdzv.endswith("-t3") and rdzv == next(a for a in torchrun_command(cfg, 3, "k", Path("x")) if "rdzv_id" in a)
    named = torchrun_command(_cfg(tmp_path, nnodes=2, rdzv_endpoint="a:1", rdzv_id="job7"), 3, "k", Path("x"))
    assert "--rdzv_id=job7-t3" in named
    assert cmd[-6:] == ["--config", "c.yaml", "--iteration", "3", "--run-key", "key"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, tiny_model_dir, prefs_file, monkeypatch, **train_over):
    """The seed stage run twice on one run directory, as nodes 0 (here) and 1 (`spa seed` in another process) of 2,
    one training process each (gloo)."""
    cfg = tiny_config(tmp_path / "nodes", tiny_model_dir, prefs_file,
                      train={"nnodes": 2, "rdzv_endpoint": f"127.0.0.1:{_free_port()}", **train_over})
    prepare.run(cfg)
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    node1 = subprocess.Popen([SPA, "seed", "-c", str(path)], env={**os.environ, "NODE_RANK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        monkeypatch.setenv("NODE_RANK", "0")
        train.run(cfg, 0)
        out = node1.communicate(timeout=300)[0]
    finally:
        if node1.poll() is None:  # node 0 failed: node 1 would wait for it until the rendezvous times out
            node1.kill()
            node1.wait()
    assert node1.returncode == 0, out[-3000:]
    return cfg, out


def _same_training(a, b):
    """The same losses per step and the same final weights."""
    logs = [read_table(RunLayout(c.run_dir).train_log(0), "train_log").to_pylist() for c in (a, b)]
    assert len(logs[0]) == len(logs[1]) > 1
    for x, y in zip(*logs, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["lr"] == pytest.approx(y["lr"])
    weights = [load_causal_lm(RunLayout(c.run_dir).model(0), "float32").state_dict() for c in (a, b)]
    for name, w in weights[0].items():
        torch.testing.assert_close(w, weights[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("against", ["one process", pytest.param("one node, two processes", marks=pytest.mark.slow)])
def test_two_nodes_train_as_one(tmp_path, tiny_model_dir, prefs_file, against, monkeypatch):
    """2 nodes x 1 process give the losses and weights of 1 node x 2 processes (slow) and so of 1 process with
    2 micro-batches accumulated (tests/test_training.py shows those two equal)."""
    nodes, out = _two_nodes(tmp_path, tiny_model_dir, prefs_file, monkeypatch)
    assert "node 1 of 2: done (node 0 records the stage)" in out
    entry = Manifest(RunLayout(nodes.run_dir).manifest).get("seed")
    assert entry["summary"]["processes"] == 2 and entry["summary"]["steps"] == 4
    ref = tiny_config(tmp_path / "ref", tiny_model_dir, prefs_file,
                      train={"num_processes": 1 if against == "one process" else 2})
    prepare.run(ref)
    train.run(ref, 0)
    _same_training(nodes, ref)
    # a node other than the first checks the manifest as node 0 does: up to date, no rendezvous to wait for
    monkeypatch.setenv("NODE_RANK", "1")
    lines = []
    assert train.run(nodes, 0, echo=lines.append).skipped and "up to date" in lines[0]
