"""SSPO and DPO+SFT in the seed stage (``train.loss: sspo`` / ``dpo+sft``, docs/variants.md 7) on the tiny model:
the gold pairs and the unpaired set trained together, the per-step values in the train log, the pseudo-labels
written, no reference for SSPO, and the iterations after it plain DPO (SSPO then SPA)."""

import json
import math

import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.config import LossKind
from spa.errors import ConfigError, StageInputError
from spa.run.layout import RunLayout
from spa.stages import prepare
from spa.stages import train as train_stage
from spa.training.rounds import resolve_round

N_UNPAIRED = 20


def _unpaired_source(tmp_path):
    path = tmp_path / "unpaired.jsonl"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"fresh question number {i}", "response": f"an answer {i} here"})
                            + "\n" for i in range(N_UNPAIRED)))
    return path


def _config(tmp_path, tiny_model_dir, prefs_file, loss, **train):
    return tiny_config(tmp_path / "run", tiny_model_dir, prefs_file,
                       data={"unpaired_source": str(_unpaired_source(tmp_path))},
                       train={"loss": loss, **train})


def test_a_loss_on_unpaired_responses_needs_an_unpaired_source(tmp_path, tiny_model_dir, prefs_file):
    with pytest.raises(ConfigError, match="data.unpaired_source"):
        tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, train={"loss": "sspo"})


def test_sspo_is_the_seed_stage_and_spa_follows(tmp_path, tiny_model_dir, prefs_file):
    cfg = _config(tmp_path, tiny_model_dir, prefs_file, "sspo")
    seed, first = resolve_round(cfg, 0), resolve_round(cfg, 1)
    lay = RunLayout(cfg.run_dir)
    assert seed.loss.kind is LossKind.SSPO and seed.unpaired == lay.unpaired and lay.unpaired in seed.inputs
    assert not seed.needs_reference and not seed.precompute_reference
    assert lay.pseudo_labels(0) in seed.outputs and lay.reference_logps(0) not in seed.outputs
    assert first.loss.kind is LossKind.DPO and first.unpaired is None and first.refines  # SPA's round from SSPO's pi_0


def test_sspo_seed_stage_trains_on_pairs_and_unpaired_responses(tmp_path, tiny_model_dir, prefs_file):
    """16 gold pairs + 20 unpaired responses, batch 4, 1 epoch: 9 steps. A fast curriculum (lambda 0.5) and a
    threshold fitted from 2 queued pairs, so every SSPO value moves within those steps."""
    cfg = _config(tmp_path, tiny_model_dir, prefs_file, "sspo", sspo={"decay": 0.5, "min_pairs": 2})
    prepare.run(cfg, echo=lambda _: None)
    result = train_stage.run(cfg, 0, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    log = pq.read_table(lay.train_log(0)).to_pylist()
    assert len(log) == math.ceil((16 + N_UNPAIRED) / 4) == result.summary["steps"]
    g_min = 16 / (16 + N_UNPAIRED)
    assert [r["sspo_g"] for r in log] == pytest.approx([max(g_min, math.exp(-0.5 * k)) for k in range(len(log))])
    assert sum(r["unpaired_rows"] for r in log) == N_UNPAIRED == result.summary["unpaired_rows_trained"]
    assert all(r["sspo_mu"] is not None and r["sspo_sigma"] > 0 for r in log)
    assert sum(r["sspo_threshold_updated"] for r in log) >= 1 and any(r["sspo_delta"] != 0 for r in log)
    pseudo = pq.read_table(lay.pseudo_labels(0)).to_pylist()
    assert sorted(r["row"] for r in pseudo) == list(range(N_UNPAIRED))  # each unpaired response once an epoch
    assert all(r["label"] == (r["z"] > r["delta"]) and abs(r["z"]) <= 5 for r in pseudo)
    unpaired_ids = pq.read_table(lay.unpaired).column("prompt_id").to_pylist()
    assert all(r["prompt_id"] == unpaired_ids[r["row"]] for r in pseudo)
    # the log's share labelled winning is the pseudo-labels' own, step by step
    for r in log:
        visits = [p for p in pseudo if p["step"] == r["step"] - 1]
        share = sum(p["label"] for p in visits) / len(visits) if visits else None
        assert r["sspo_positive_share"] == pytest.approx(share) if share is not None else r["sspo_positive_share"] is None
    assert not lay.reference_logps(0).exists() and (lay.model(0) / "model.safetensors").exists()
    assert result.summary["loss"] == "sspo" and result.summary["sspo_final_g"] == pytest.approx(log[-1]["sspo_g"], abs=1e-4)
    # the unpaired set is an input of the stage: a changed set retrains, the same one does not
    assert train_stage.run(cfg, 0, echo=lambda _: None).skipped
    table = pq.read_table(lay.unpaired)
    pq.write_table(table.slice(0, N_UNPAIRED - 1), lay.unpaired)
    assert not train_stage.run(cfg, 0, echo=lambda _: None).skipped


@pytest.mark.parametrize("precompute", [True, False], ids=["reference-once", "reference-model"])
def test_dpo_plus_sft_starts_at_ln2_and_adds_the_unpaired_nll(tmp_path, tiny_model_dir, prefs_file, precompute):
    """DPO+SFT: the gold term starts at ln 2 (policy = reference at step 0) and the SFT term is the unpaired
    responses' per-token negative log-likelihood, weighted by ``train.dpo_sft.weight``; the reference's log-probs
    computed once for the pairs, or by a reference model on the pairs of each micro-batch."""
    cfg = _config(tmp_path, tiny_model_dir, prefs_file, "dpo+sft", dpo_sft={"weight": 0.5},
                  precompute_reference=precompute)
    prepare.run(cfg, echo=lambda _: None)
    train_stage.run(cfg, 0, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    log = pq.read_table(lay.train_log(0)).to_pylist()
    first = log[0]
    assert first["gold_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["unpaired_loss"] > 0 and first["sspo_g"] is None
    assert sum(r["unpaired_rows"] for r in log) == N_UNPAIRED
    if precompute:  # DPO's reference, computed once for the pairs only
        assert pq.read_table(lay.reference_logps(0)).num_rows == 16
    else:
        assert not lay.reference_logps(0).exists()
    assert not lay.pseudo_labels(0).exists()


def test_spa_run_with_sspo_then_spa_end_to_end(tmp_path, tiny_model_dir, prefs_file):
    """``spa run`` (the Prefect flow, stages inline) with ``train.loss: sspo``: prepare writes the unpaired set, the
    seed stage trains SSPO on it, and iteration 1 is SPA's refined DPO from SSPO's pi_0, judged against pi_init."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    cfg = _config(tmp_path, tiny_model_dir, prefs_file, "sspo")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"stage_processes": "inline"}))
    res = subprocess.run([str(Path(sys.executable).parent / "spa"), "run", str(path)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lay = RunLayout(cfg.run_dir)
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert {"prepare", "seed", "sample/1", "judge/1", "train/1", "evaluate/1"} <= set(stages)
    assert pq.read_table(lay.pseudo_labels(0)).num_rows == N_UNPAIRED
    assert pq.read_table(lay.refinement(1)).num_rows > 0  # SPA's refinement ran in the round after SSPO
    assert "sspo_g" in pq.read_schema(lay.train_log(0)).names
    assert pq.read_table(lay.train_log(1)).column("sspo_g").null_count == pq.read_table(lay.train_log(1)).num_rows


def test_a_killed_sspo_seed_stage_resumes_with_the_same_threshold(tmp_path, tiny_model_dir, prefs_file):
    """The checkpoint carries SSPO's statistics, threshold, queue and pseudo-labels: killed after its first
    checkpoint and resumed, the seed stage writes the same train log and pseudo-labels as an uninterrupted one."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import kill_after_first_checkpoint

    spa = str(Path(sys.executable).parent / "spa")
    over = {"sspo": {"decay": 0.2, "min_pairs": 2}, "seed_epochs": 2, "save_steps": 3}
    ref = _config(tmp_path / "ref", tiny_model_dir, prefs_file, "sspo", **over)
    prepare.run(ref, echo=lambda _: None)
    train_stage.run(ref, 0, echo=lambda _: None)
    cfg = _config(tmp_path / "cut", tiny_model_dir, prefs_file, "sspo", **over)
    path = tmp_path / "cut" / "cut.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    lay = RunLayout(cfg.run_dir)
    prepare.run(cfg, echo=lambda _: None)
    kill_after_first_checkpoint([spa, "seed", "-c", str(path)], lay.checkpoints(0))
    assert not lay.pseudo_labels(0).exists()
    res = subprocess.run([spa, "seed", "-c", str(path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[seed] resuming from checkpoint-" in res.stdout + res.stderr
    want, got = (pq.read_table(RunLayout(c.run_dir).train_log(0)).to_pylist() for c in (ref, cfg))
    assert len(got) == len(want) == 18
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "sspo_delta", "sspo_mu", "sspo_sigma", "sspo_g"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    labels = [pq.read_table(RunLayout(c.run_dir).pseudo_labels(0)).select(["row", "step", "label"]).to_pylist()
              for c in (ref, cfg)]
    assert labels[0] == labels[1] and len(labels[0]) == 2 * N_UNPAIRED


def test_sspo_on_two_processes_matches_one(tmp_path, tiny_model_dir, prefs_file):
    """torchrun with 2 CPU processes (gloo): the statistics and the threshold move over the rewards of both ranks, so
    the train log and the pseudo-labels equal one process's with gradient accumulation."""
    logs, labels = [], []
    for n in (1, 2):
        cfg = _config(tmp_path / f"p{n}", tiny_model_dir, prefs_file, "sspo", num_processes=n,
                      sspo={"decay": 0.5, "min_pairs": 2})
        prepare.run(cfg, echo=lambda _: None)
        train_stage.run(cfg, 0, echo=lambda _: None)
        lay = RunLayout(cfg.run_dir)
        logs.append(pq.read_table(lay.train_log(0)).to_pylist())
        labels.append(sorted((r["row"], r["step"], r["label"]) for r in pq.read_table(lay.pseudo_labels(0)).to_pylist()))
    assert len(logs[0]) == len(logs[1]) == 9
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "sspo_mu", "sspo_sigma", "sspo_delta", "sspo_positive_share", "unpaired_rows"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
    assert labels[0] == labels[1]


def test_unpaired_rows_drawn_from_the_prompt_batches():
    from spa.stages.unpaired import chosen_rows

    assert chosen_rows(5, None, 0).tolist() == [0, 1, 2, 3, 4]
    some = chosen_rows(24, 10, 7)
    assert len(some) == 10 and len(set(some.tolist())) == 10 and list(some) == sorted(some) and max(some) < 24
    assert chosen_rows(24, 10, 7).tolist() == some.tolist() != chosen_rows(24, 10, 8).tolist()  # seeded
    assert len(chosen_rows(24, 0.25, 7)) == 6
    with pytest.raises(StageInputError, match="X_1..X_T hold 24 prompts"):
        chosen_rows(24, 25, 7)
    with pytest.raises(StageInputError, match="whole count"):
        chosen_rows(24, 2.5, 7)
    with pytest.raises(StageInputError, match="no prompt at all"):
        chosen_rows(24, 0.01, 7)


def test_sspo_unpaired_set_sampled_from_pi_init(tmp_path, tiny_model_dir, prefs_file):
    """``data.unpaired_source: pi_init``: no second source; the seed stage first samples pi_init once on 10 of the
    24 prompts of X_1..X_2 (its own manifest entry ``unpaired``), then trains SSPO on those answers. Resumable: a
    second seed stage samples nothing, a changed sampling setting draws the set again."""
    from spa.run.manifest import Manifest
    from spa.stages import unpaired
    from spa.stages.unpaired import chosen_rows

    with pytest.raises(ConfigError, match="iterations: 0"):
        tiny_config(tmp_path / "r0", tiny_model_dir, prefs_file, iterations=0,
                    data={"unpaired_source": "pi_init"}, train={"loss": "sspo"})
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, iterations=2,
                      data={"prompt_sizes": [12, 12], "unpaired_source": "pi_init", "unpaired_size": 10},
                      sample={"chunk_rows": 5, "max_new_tokens": 8}, train={"loss": "sspo"})
    prepare.run(cfg, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    assert not lay.unpaired.exists()  # prepare reads no unpaired source
    # several nodes cannot wait for the sampling: each says to draw the set first, and nothing is trained
    nodes = cfg.model_copy(update={"train": cfg.train.model_copy(update={"nnodes": 2, "rdzv_endpoint": "h:1"})})
    with pytest.raises(StageInputError, match="draw it first on one node"):
        train_stage.run(nodes, 0, echo=lambda _: None)
    assert not lay.model(0).exists()
    result = train_stage.run(cfg, 0, echo=lambda _: None)
    entries = Manifest(lay.manifest).entries()
    summary = entries["unpaired"]["summary"]
    table = pq.read_table(lay.unpaired).to_pylist()
    assert summary["prompts_in_batches"] == 24 and summary["prompts_sampled"] == 10
    assert summary["unpaired"] == len(table) == 10 - summary["empty_dropped"] > 0
    batches = pq.read_table(lay.prompts(1)).to_pylist() + pq.read_table(lay.prompts(2)).to_pylist()
    chosen = chosen_rows(24, 10, cfg.data.shuffle_seed).tolist()
    assert {r["source_row"] for r in table} <= set(chosen)
    for r in table:  # each answer sits beside the prompt of X_1..X_T it answers
        assert (r["prompt_id"], r["prompt"]) == (batches[r["source_row"]]["prompt_id"], batches[r["source_row"]]["prompt"])
        assert r["response"].strip()
    # an answer cut off at sample.max_new_tokens (8) is marked, so training does not end it with end-of-turn
    cut = [r for r in table if not r["finished"]]
    assert cut and len(cut) <= round(summary["truncated_share"] * 10)
    seed_prompts = set(pq.read_table(lay.seed).column("prompt").to_pylist())
    assert not seed_prompts & {r["prompt"] for r in table}
    assert pq.read_table(lay.pseudo_labels(0)).num_rows == len(table) and result.summary["loss"] == "sspo"
    assert result.summary["unpaired_rows_trained"] == len(table)
    # resumed: nothing sampled or trained again, also under settings that do not change the draw (so pi_0 is not
    # retrained for them); another temperature is another unpaired set
    assert train_stage.run(cfg, 0, echo=lambda _: None).skipped and unpaired.is_drawn(cfg) and unpaired.is_drawn(nodes)
    assert unpaired.run(cfg, echo=lambda _: None).skipped
    chunked = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"chunk_rows": 7})})
    assert unpaired.run(chunked, echo=lambda _: None).skipped
    # the transformers backend draws a batch from one generator: its batch size is part of the draw (vLLM's is not)
    wider = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"batch_size": 3, "backend": "transformers"})})
    assert not unpaired.is_drawn(wider)
    assert unpaired._key(wider)[1]["batch_size"] == 3
    assert "batch_size" not in unpaired._key(cfg.model_copy(update={"sample": cfg.sample.model_copy(
        update={"backend": "vllm"})}))[1]
    hotter = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"temperature": 1.3})})
    assert not unpaired.is_drawn(hotter) and not unpaired.run(hotter, echo=lambda _: None).skipped
    # sample.python another interpreter (the vLLM environment in a real run): the same set, sampled over there
    import os
    import sys

    bindir = os.path.dirname(sys.executable)  # a sibling name of this interpreter: another path, the same venv
    other = next((os.path.join(bindir, n) for n in ("python3", "python", "python3.11")
                  if n != os.path.basename(sys.executable) and os.path.exists(os.path.join(bindir, n))), sys.executable)
    relayed = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"python": str(other)})})
    unpaired.run(relayed, force=True, echo=lambda _: None)
    assert pq.read_table(lay.unpaired).to_pylist() == table


def test_sspo_with_dpos_implicit_reward(tmp_path, tiny_model_dir, prefs_file):
    """``train.sspo.reward: implicit``: SSPO's reward is DPO's Eq. 4 against pi_init (a reference model in memory),
    the margin defaults to 0, so the first step's gold term is DPO's ln 2 and every reward of step 0 is 0 (the
    policy is still pi_init); later rewards move."""
    from spa.config import SSPOConfig

    assert SSPOConfig(reward="implicit").margin == 0.0 and SSPOConfig(reward="implicit", margin=1.0).margin == 1.0
    assert SSPOConfig().margin == 2.0 and "reward" not in SSPOConfig().model_dump()  # the paper's: not written
    cfg = _config(tmp_path, tiny_model_dir, prefs_file, "sspo", sspo={"reward": "implicit", "decay": 0.5, "min_pairs": 2},
                  warmup_ratio=0.0)  # the first step moves the policy
    rnd = resolve_round(cfg, 0)
    assert rnd.needs_reference and not rnd.precompute_reference
    prepare.run(cfg, echo=lambda _: None)
    train_stage.run(cfg, 0, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    log = pq.read_table(lay.train_log(0)).to_pylist()
    assert log[0]["gold_loss"] == pytest.approx(math.log(2), abs=1e-4)
    pseudo = pq.read_table(lay.pseudo_labels(0)).to_pylist()
    first = [p["reward"] for p in pseudo if p["step"] == 0]
    later = [p["reward"] for p in pseudo if p["step"] > 0]
    assert first and all(abs(r) < 1e-5 for r in first)
    assert later and max(abs(r) for r in later) > 1e-4
    assert len(pseudo) == N_UNPAIRED
    # step 0's flat rewards set no statistics; step 1's do, so its z are not blown up to the clip
    assert log[0]["sspo_sigma"] is None and log[1]["sspo_sigma"] > 0
    second = [p for p in pseudo if p["step"] == 1]
    assert second and all(abs(p["z"]) < 5 for p in second)
    # step 0: sigma 1 (not the float noise between two forward passes of one model), so every z ~ 0
    assert all(abs(p["z"]) < 1e-3 for p in pseudo if p["step"] == 0)


def test_unpaired_answer_cut_off_gets_no_end_of_turn(tiny_model_dir):
    """A pi_init answer that stopped at its token cap is rendered without the end-of-turn token (as the rounds'
    truncated answers are); a finished one, and every row of a file source (no ``finished`` given), with it."""
    from spa.models.rendering import load_tokenizer
    from spa.training.pairs import MixedDataset, PairDataset

    tok = load_tokenizer(tiny_model_dir)
    pairs = PairDataset(tok, ["Say apple"], ["apple"], ["no"], 64)
    prompts, answers = ["Say pear", "Say pear"], ["pear pear", "pear pear"]
    ended, cut = MixedDataset(pairs, tok, prompts, answers, 64, finished=[True, False]).singles
    assert list(cut.input_ids) == list(ended.input_ids)[:len(cut.input_ids)]
    assert len(ended.input_ids) > len(cut.input_ids)
    assert tok.convert_ids_to_tokens(list(ended.input_ids)[len(cut.input_ids):])  # the end-of-turn marker
    default = MixedDataset(pairs, tok, prompts, answers, 64).singles
    assert [list(e.input_ids) for e in default] == [list(ended.input_ids)] * 2
