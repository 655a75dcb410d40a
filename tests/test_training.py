"""Training stage: data parallelism, resume after a kill, LoRA."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import kill_after_first_checkpoint, tiny_config

from spa.models.loading import load_causal_lm
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.stages import prepare, train
from spa.training.rounds import resolve_round

SPA = str(Path(sys.executable).parent / "spa")


def _seed_run(tmp_path, name, tiny_model_dir, prefs_file, **train_over):
    cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file, train=train_over)
    prepare.run(cfg)
    train.run(cfg, 0)
    return cfg, read_table(RunLayout(cfg.run_dir).train_log(0), "train_log").to_pylist()


def test_two_processes_match_one(tmp_path, tiny_model_dir, prefs_file):
    """torchrun with 2 CPU processes (gloo) gives the same losses as 1 process with accumulation."""
    _, one = _seed_run(tmp_path, "one", tiny_model_dir, prefs_file, num_processes=1, seed_epochs=2)
    _, two = _seed_run(tmp_path, "two", tiny_model_dir, prefs_file, num_processes=2, seed_epochs=2)
    assert len(one) == len(two) == 8
    # the reference log-probs, scored in two strided shares and gathered, are the single process's
    refs = [read_table(RunLayout(tmp_path / n).reference_logps(0), "reference_logps").to_pylist()
            for n in ("one", "two")]
    for a, b in zip(*refs, strict=True):
        assert a["row"] == b["row"] and a["ref_logp_chosen"] == pytest.approx(b["ref_logp_chosen"], abs=1e-4)
        assert a["ref_logp_rejected"] == pytest.approx(b["ref_logp_rejected"], abs=1e-4)
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == pytest.approx(b["lr"])
    assert one[-1]["loss"] < one[0]["loss"]


def test_refinement_window_under_two_processes_matches_one(tmp_path, tiny_model_dir, prefs_file):
    """An iteration with SR + DND: 2 ranks x 2 pairs with the global window flag exactly what 1 process
    with micro-batches of 4 flags (a rank-local window would not)."""
    import shutil

    logs = []
    for n in (1, 2):
        cfg = tiny_config(tmp_path / f"r{n}", tiny_model_dir, prefs_file,
                          train={"num_processes": n, "micro_batch_size": 4 // n,
                                 "refinement": {"window": 8, "k_percent": 25.0}})
        prepare.run(cfg)
        lay = RunLayout(cfg.run_dir)
        # iteration 1 trains on the seed pairs judged "as is": build judgments from the seed set
        _fake_judgments(lay)
        shutil.copytree(cfg.model.pi_init, lay.model(0))
        train.run(cfg, 1)
        logs.append(read_table(lay.train_log(1), "train_log").to_pylist())
    for a, b in zip(*logs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["refined_fraction"] == b["refined_fraction"]
        assert (a["tau"] is None and b["tau"] is None) or a["tau"] == pytest.approx(b["tau"], abs=1e-5)
    assert any(r["refined_fraction"] > 0 for r in logs[0])


def _fake_judgments(lay):
    import pyarrow as pa

    from spa.run.artifacts import write_table

    seed = read_table(lay.seed, "seed")
    n = seed.num_rows
    write_table(seed.append_column("p_chosen", pa.array([0.6] * n)).append_column(
        "policy_logp_chosen", pa.array([-1.0] * n)).append_column("policy_logp_rejected", pa.array([-2.0] * n))
        .append_column("ref_logp_chosen", pa.array([-1.0] * n)).append_column("ref_logp_rejected", pa.array([-1.0] * n))
        .append_column("tie", pa.array([False] * n)).append_column("judge", pa.array(["test"] * n)),
        lay.judgments(1), "judgments")


def test_a_judged_pair_too_long_for_training_is_named_by_its_prompt_id(tmp_path, tiny_model_dir, prefs_file):
    import shutil

    from spa.errors import SequenceTooLongError

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    prepare.run(cfg)
    lay = RunLayout(cfg.run_dir)
    _fake_judgments(lay)
    shutil.copytree(cfg.model.pi_init, lay.model(0))
    first = read_table(lay.judgments(1), "judgments")["prompt_id"][0].as_py()
    short = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, model={"max_length": 8})
    with pytest.raises(SequenceTooLongError, match=rf"judgments.parquet, prompt_id '{first}': prompt \("):
        train.run(short, 1)


def test_killed_training_resumes_from_checkpoint_with_same_result(tmp_path, tiny_model_dir, prefs_file):
    """Resumed, even under another checkpoint cadence (train.save_steps is operational), silently and exactly."""
    over = {"seed_epochs": 12, "save_steps": 3}
    _, uninterrupted = _seed_run(tmp_path, "ref", tiny_model_dir, prefs_file, **over)

    cfg = tiny_config(tmp_path / "killed", tiny_model_dir, prefs_file, train=over)
    prepare.run(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    lay = RunLayout(cfg.run_dir)
    kill_after_first_checkpoint([SPA, "seed", "-c", str(path)], lay.checkpoints(0))
    assert not lay.model(0).exists() and not lay.train_log(0).exists()  # nothing partial left behind

    res = subprocess.run([SPA, "seed", "-c", str(path), "-s", "train.save_steps=4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = res.stdout + res.stderr
    assert "[seed] resuming from checkpoint-" in out  # the checkpoint's run key ignores save_steps
    # tied embeddings: the checkpoint has no lm_head.weight, which is the embedding itself (not "missing"); and
    # the new cadence is adopted (no "arguments do not match the ones in the trainer_state.json")
    assert "missing keys" not in out, out[-3000:]
    assert "do not match" not in out, out[-3000:]
    resumed = read_table(lay.train_log(0), "train_log").to_pylist()
    assert len(resumed) == len(uninterrupted) == 48
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    a = load_causal_lm(lay.model(0), "float32", "cpu").state_dict()
    b = load_causal_lm(RunLayout(tmp_path / "ref").model(0), "float32", "cpu").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_the_checkpoint_key_ignores_the_checkpoint_cadence(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    prepare.run(cfg)
    key = train.run_key(cfg, resolve_round(cfg, 0))
    other = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, train={"save_steps": 9})
    assert train.run_key(other, resolve_round(other, 0)) == key
    beta = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, train={"beta": 0.2})
    assert train.run_key(beta, resolve_round(beta, 0)) != key


def test_lora_training_merges_the_adapter(tmp_path, tiny_model_dir, prefs_file):
    cfg, log = _seed_run(tmp_path, "lora", tiny_model_dir, prefs_file, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                         learning_rate=5e-3, seed_epochs=2)
    out = RunLayout(cfg.run_dir).model(0)
    assert not (out / "adapter_config.json").exists()  # merged: the next iteration starts from full weights
    assert log[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # disabled adapter = reference at step 0
    assert log[-1]["loss"] < log[0]["loss"]
    merged = load_causal_lm(out, "float32", "cpu").state_dict()
    base = load_causal_lm(tiny_model_dir, "float32", "cpu").state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_lora_adapter_starts_from_the_seed_alone(tiny_model_dir):
    """A's random start comes from train.seed, whatever the process drew before (a stage process, a flow's process
    and each torchrun rank start the same adapter), and the global generator is left as it was."""
    from spa.config import LoraConfig
    from spa.training.worker import with_adapter

    lora = LoraConfig(r=4, alpha=8, target_modules=["q_proj"])

    def adapter_a(seed):
        model = with_adapter(load_causal_lm(tiny_model_dir, "float32", "cpu"), lora, seed)
        return {k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k}

    torch.manual_seed(1)
    first = adapter_a(0)
    torch.rand(1000)  # the process has drawn other numbers since
    state = torch.random.get_rng_state()
    again = adapter_a(0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], v) for k, v in adapter_a(1).items())


def test_group_by_length_puts_similar_lengths_in_a_micro_batch(tmp_path, tiny_model_dir, prefs_file):
    """train.group_by_length: the sampler groups pairs by padded width within each optimiser batch, the
    stage trains as usual; off by default (Trainer's random order)."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from spa.models.rendering import load_tokenizer
    from spa.training.pairs import PairDataset
    from spa.training.trainer import RefinedDPOTrainer

    cfg, log = _seed_run(tmp_path, "grouped", tiny_model_dir, prefs_file, group_by_length=True)
    assert len(log) > 0 and log[-1]["loss"] < log[0]["loss"] + 0.05
    tok = load_tokenizer(tiny_model_dir)
    texts = ["a", "a b c d e f g h i j k l", "b", "c d e f g h i j k l m n"] * 4
    ds = PairDataset(tok, ["q"] * 16, texts, ["x"] * 16, 256)
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, report_to=[], use_cpu=True)
    model = load_causal_lm(tiny_model_dir, "float32", "cpu")
    grouped = RefinedDPOTrainer(model=model, args=args, train_dataset=ds, ref_model=model, beta=0.1, refine=None,
                                group_by_length=True)
    sampler = grouped._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(iter(sampler))
    widths = ds.lengths()
    pairs = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert sum(widths[a] == widths[b] for a, b in pairs) >= 6  # long with long, short with short
    plain = RefinedDPOTrainer(model=model, args=args, train_dataset=ds, ref_model=model, beta=0.1, refine=None)
    assert not isinstance(plain._get_train_sampler(), LengthGroupedSampler)


def test_reference_logps_computed_once_and_no_reference_model_loaded(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    """Without DND the reference enters only as sequence log-probs: they are computed once before training
    (iter_t/reference_logps.parquet, values of pi_init), no second model is loaded, and training matches the
    online reference to float noise."""
    from conftest import dense_logp_of_ids

    import spa.models.loading
    from spa.models.rendering import load_tokenizer, prompt_ids, response_ids

    loads = []
    real = spa.models.loading.load_causal_lm
    monkeypatch.setattr(spa.models.loading, "load_causal_lm", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    cfg, pre = _seed_run(tmp_path, "pre", tiny_model_dir, prefs_file, seed_epochs=2)
    assert len(loads) == 1  # the policy only
    _, online = _seed_run(tmp_path, "online", tiny_model_dir, prefs_file, seed_epochs=2, precompute_reference=False)
    assert len(loads) == 3  # policy + reference
    for a, b in zip(pre, online, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)

    lay = RunLayout(cfg.run_dir)
    ref = read_table(lay.reference_logps(0), "reference_logps").to_pylist()
    seed = read_table(lay.seed, "seed").to_pylist()
    assert [r["row"] for r in ref] == list(range(len(seed)))
    tok = load_tokenizer(tiny_model_dir)
    model = real(tiny_model_dir, "float32", "cpu")
    for r, pair in list(zip(ref, seed, strict=True))[:3]:
        p = prompt_ids(tok, pair["prompt"])
        assert r["ref_logp_chosen"] == pytest.approx(dense_logp_of_ids(model, p, response_ids(tok, pair["prompt"], pair["chosen"], True)), abs=1e-4)
        assert r["ref_logp_rejected"] == pytest.approx(dense_logp_of_ids(model, p, response_ids(tok, pair["prompt"], pair["rejected"], True)), abs=1e-4)
    assert not (RunLayout(tmp_path / "online").reference_logps(0)).exists()
    # DND needs the reference's full logits: iterations with lambda > 0 keep the reference model
    assert resolve_round(cfg, 0).precompute_reference and not resolve_round(cfg, 1).precompute_reference
    no_dnd = cfg.model_copy(update={"train": cfg.train.model_copy(update={"refinement": cfg.train.refinement.model_copy(
        update={"decoupled": False})})})
    assert resolve_round(no_dnd, 1).precompute_reference


def test_dnd_reference_is_loaded_in_the_policys_precision(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    """With DND the reference model is kept in memory; it must run in exactly the policy's precision (fp32
    weights under the same autocast), or pi_theta = pi_ref no longer gives margin 0 at step 0. On a bf16 GPU
    ``auto`` loads bf16 weights: simulated here by making ``auto`` resolve to bf16."""
    import dataclasses

    import spa.models.loading as loading
    from spa.training.worker import load_models

    real_resolve = loading.resolve_dtype
    monkeypatch.setattr(loading, "resolve_dtype",
                        lambda name, device="cpu": torch.bfloat16 if name == "auto" else real_resolve(name, device))
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, train={"precision": "bf16"})
    rnd = dataclasses.replace(resolve_round(cfg, 1), start=Path(tiny_model_dir))  # pi_0 stands in for pi_{t-1}
    assert rnd.dnd_lambda > 0 and not rnd.precompute_reference
    policy, ref = load_models(cfg, rnd)
    assert ref is not None
    assert next(ref.parameters()).dtype == next(policy.parameters()).dtype == torch.float32
