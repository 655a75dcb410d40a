"""Each stage on the tiny model, chained through the `spa` commands alone (one iteration)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import copy_without_chat_template, dense_logp_of_ids, tiny_config

from spa.models.loading import load_causal_lm
from spa.models.rendering import eot_id, load_tokenizer, prompt_ids, response_ids
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout

SPA = str(Path(sys.executable).parent / "spa")


def spa(*args, check=True):
    res = subprocess.run([SPA, *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"spa {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def chained(tmp_path_factory, tiny_model_dir, prefs_file):
    root = tmp_path_factory.mktemp("chain")
    cfg = tiny_config(root / "run", tiny_model_dir, prefs_file)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    outs = {}
    for stage, extra in (("prepare", []), ("seed", []), ("sample", ["-t", "1"]), ("judge", ["-t", "1"]),
                         ("train", ["-t", "1"]), ("evaluate", ["-t", "1"])):
        outs[stage] = spa(stage, "-c", str(path), *extra)
    return cfg, path, outs


def test_every_artifact_exists_and_validates(chained):
    cfg, _, outs = chained
    lay = RunLayout(cfg.run_dir)
    for kind, path in (("seed", lay.seed), ("heldout", lay.heldout), ("prompts", lay.prompts(1)),
                       ("responses", lay.responses(1)), ("judgments", lay.judgments(1)),
                       ("train_log", lay.train_log(0)), ("train_log", lay.train_log(1)), ("eval", lay.eval_table(1))):
        assert read_table(path, kind).num_rows > 0, path
    for t in (0, 1):
        assert (lay.model(t) / "model.safetensors").exists() and (lay.model(t) / "tokenizer.json").exists()
        assert not lay.checkpoints(t).exists()  # checkpoints are removed once the stage is done
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert set(stages) == {"prepare", "seed", "sample/1", "judge/1", "train/1", "evaluate/1"}
    for entry in stages.values():
        assert entry["outputs"] and entry["config_hash"] and entry["wall_time_s"] >= 0 and "torch" in entry["versions"]
    summary = json.loads(lay.eval_summary(1).read_text())
    assert 0.0 <= summary["gold_agreement"] <= 1.0 and summary["n"] == 4 and summary["avg_length"] > 0
    assert "done in" in outs["judge"].stdout


def test_rerun_says_up_to_date_and_changed_config_reruns(chained):
    cfg, path, _ = chained
    res = spa("judge", "-c", str(path), "-t", "1")
    assert "up to date" in res.stdout
    res = spa("judge", "-c", str(path), "-t", "1", "-s", "judge.beta=0.2")
    assert "done in" in res.stdout
    spa("judge", "-c", str(path), "-t", "1")  # back to the original labels for the other tests


def test_a_new_checkpoint_cadence_keeps_the_trained_stages(chained):
    """train.save_steps is operational (spa.config.OPERATIONAL): the seed and train stages stay up to date."""
    cfg, path, _ = chained
    for stage, extra in (("seed", []), ("train", ["-t", "1"])):
        res = spa(stage, "-c", str(path), *extra, "-s", f"train.save_steps={cfg.train.save_steps + 5}")
        assert "up to date" in res.stdout, res.stdout[-2000:]


def test_responses_record_finish_reasons_and_counts(chained):
    cfg, _, _ = chained
    table = read_table(RunLayout(cfg.run_dir).responses(1), "responses")
    for row in table.to_pylist():
        assert len(row["responses"]) == 2
        for reason, n in zip(row["finish_reasons"], row["num_tokens"], strict=True):
            assert reason in ("stop", "length")
            assert n <= cfg.sample.max_new_tokens
            if reason == "length":
                assert n == cfg.sample.max_new_tokens


def _dense_logp(model, tok, prompt, response, finished):
    return dense_logp_of_ids(model, prompt_ids(tok, prompt), response_ids(tok, prompt, response, finished))


def test_judge_p_chosen_recomputed_independently(chained):
    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    judged = read_table(lay.judgments(1), "judgments").to_pylist()
    policy, ref = load_causal_lm(lay.model(0), "float32", "cpu"), load_causal_lm(cfg.model.pi_init, "float32", "cpu")
    tok = load_tokenizer(lay.model(0))
    beta = cfg.judge.beta
    for row in judged[:6]:
        rc = beta * (_dense_logp(policy, tok, row["prompt"], row["chosen"], row["chosen_finished"])
                     - _dense_logp(ref, tok, row["prompt"], row["chosen"], row["chosen_finished"]))
        rr = beta * (_dense_logp(policy, tok, row["prompt"], row["rejected"], row["rejected_finished"])
                     - _dense_logp(ref, tok, row["prompt"], row["rejected"], row["rejected_finished"]))
        p = 1 / (1 + math.exp(-(rc - rr)))
        assert row["p_chosen"] == pytest.approx(p, abs=1e-5)
        assert row["p_chosen"] >= 0.5


def test_judged_lengths_have_one_definition(chained):
    """|y| (Eq. 13's length, chosen_tokens/rejected_tokens) is the response's tokens without the end-of-turn
    token, finished or not: the count ``responses.parquet`` records for the same text."""
    import pyarrow as pa

    from spa.judges.scoring import Judges
    from spa.stages.judge import judge_rows

    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    tok = load_tokenizer(lay.model(0))
    rows = pa.table({"prompt_id": ["a", "b"], "prompt": ["q1", "q2"],
                     "responses": [["apple pie", "banana"], ["cherry and grape", "x y z"]],
                     "finish_reasons": [["stop", "length"], ["length", "stop"]]})
    judged = judge_rows(rows, Judges(cfg, 1), cfg, 1).to_pylist()
    judged += read_table(lay.judgments(1), "judgments").to_pylist()
    sides = [r[f"{s}_finished"] for r in judged for s in ("chosen", "rejected")]
    assert any(sides) and not all(sides)
    for row in judged:
        for side in ("chosen", "rejected"):
            assert row[f"{side}_tokens"] == len(response_ids(tok, row["prompt"], row[side], False)), row


def test_seed_loss_starts_at_ln2_and_decreases(chained):
    cfg, _, _ = chained
    log = read_table(RunLayout(cfg.run_dir).train_log(0), "train_log")
    losses = log.column("loss").to_pylist()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0]
    assert log.column("refined_fraction").to_pylist() == [0.0] * log.num_rows  # seed stage is plain DPO


def test_iteration_training_refines_after_warmup(chained):
    cfg, _, _ = chained
    log = read_table(RunLayout(cfg.run_dir).train_log(1), "train_log").to_pylist()
    warm = math.ceil(cfg.train.refinement.warmup_fraction * len(log))
    assert all(r["refined_fraction"] == 0.0 for r in log[:warm])
    assert any(r["refined_fraction"] > 0 for r in log[warm:])
    assert all(r["tau"] is not None for r in log)
    lrs = [r["lr"] for r in log]
    assert max(lrs) <= cfg.train.learning_rate + 1e-12


def test_trained_models_differ_from_their_start(chained):
    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    w = [load_causal_lm(p, "float32", "cpu").model.embed_tokens.weight for p in (cfg.model.pi_init, lay.model(0), lay.model(1))]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


def test_missing_previous_artifact_is_one_clear_error(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = spa("judge", "-c", str(path), "-t", "1", check=False)
    assert res.returncode == 2
    assert "responses.parquet: responses is missing; run `spa sample --iteration 1` first" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "iter_1").exists()


def test_sampling_an_iteration_beyond_the_configured_ones_says_how_many_there_are(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)  # iterations: 1
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = spa("sample", "-c", str(path), "-t", "3", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "no prompt set for iteration 3: the run has 1 iteration(s) configured" in res.stderr, res.stderr
    assert "`spa expand`" in res.stderr and "run `spa prepare` first" not in res.stderr


def test_model_without_chat_template_is_one_clear_error(tmp_path, tiny_model_dir, prefs_file, chained):
    bad = copy_without_chat_template(tiny_model_dir, tmp_path / "bad_model")
    cfg = tiny_config(tmp_path / "run", bad, prefs_file)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # prepare measures token lengths with pi_init's tokenizer: the first stage to open it says so
    res = spa("prepare", "-c", str(path), check=False)
    assert res.returncode == 2 and "no chat template" in res.stderr
    assert not RunLayout(cfg.run_dir).seed.exists()
    # the seed stage says the same when the data were prepared with another model (in this process: the command's
    # exit code 2 for every bad-input error is tests/test_bad_inputs.py's)
    from spa.errors import BadInput
    from spa.stages import prepare, train

    prepare.run(tiny_config(tmp_path / "run", tiny_model_dir, prefs_file), echo=lambda *_: None)
    with pytest.raises(BadInput, match="no chat template"):
        train.run(cfg, 0, echo=lambda *_: None)
    assert not RunLayout(cfg.run_dir).model(0).exists()


def test_prompt_over_context_is_an_error_without_partial_output(tmp_path, tiny_model_dir, prefs_file, chained):
    cfg0, _, _ = chained
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, model={"max_length": 20},
                      sample={"max_new_tokens": 8})
    from spa.stages import sample

    lay = RunLayout(cfg.run_dir)
    lay.data.mkdir(parents=True)
    import shutil

    shutil.copy(RunLayout(cfg0.run_dir).prompts(1), lay.prompts(1))
    shutil.copytree(RunLayout(cfg0.run_dir).model(0), lay.model(0))
    with pytest.raises(ValueError, match=r"row \d+: prompt has \d+ tokens; with max_new_tokens=8 it exceeds"):
        sample.run(cfg, 1)
    assert not lay.responses(1).exists()
    assert list(lay.iteration(1).glob("*")) == []


def test_ties_are_kept_out_of_training(tmp_path, chained):
    """Identical responses are a tie (p = 0.5) and never reach the optimiser."""
    import pyarrow as pa

    from spa.judges.scoring import Judges
    from spa.stages.judge import judge_rows
    from spa.training.data import training_pairs

    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    rows = pa.table({"prompt_id": ["a", "b"], "prompt": ["q1", "q2"], "responses": [["same", "same"], ["x", "y z"]],
                     "finish_reasons": [["stop", "stop"], ["stop", "length"]]})
    out = judge_rows(rows, Judges(cfg, 1), cfg, 1).to_pylist()
    assert out[0]["tie"] and out[0]["p_chosen"] == 0.5
    assert not out[1]["tie"] and out[1]["p_chosen"] > 0.5
    judged = read_table(lay.judgments(1), "judgments")
    n_train = len(training_pairs(cfg, 1)["prompt"])
    assert n_train == judged.num_rows - int(np.sum(judged.column("tie").to_numpy()))


# --- judge reuse of the sampler's log-probs (issue 9, P3) ---

def test_sampler_records_raw_logps_of_the_sampled_ids(chained):
    """``sampled_logps`` is log pi_{t-1} of the exact sampled ids, before temperature (T = 0.7 here): a dense
    rescoring of those ids with pi_0 gives the same number, and the stop token is among the ids."""
    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    rows = read_table(lay.responses(1), "responses").to_pylist()
    policy, tok = load_causal_lm(lay.model(0), "float32", "cpu"), load_tokenizer(lay.model(0))
    end = eot_id(tok)
    checked = 0
    for row in rows[:6]:
        assert row["logp_dtype"] == "float32"
        for ids, logp, reason, n in zip(row["token_ids"], row["sampled_logps"], row["finish_reasons"],
                                        row["num_tokens"], strict=True):
            assert len(ids) == n + (reason == "stop")
            if reason == "stop":
                assert ids[-1] == end
            dense = dense_logp_of_ids(policy, prompt_ids(tok, row["prompt"]), ids)
            assert logp == pytest.approx(dense, abs=1e-3)
            checked += 1
    assert checked >= 12


def test_a_finished_sample_keeps_its_stop_token_and_its_log_prob():
    from spa.models.sampling import _samples

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    out = _samples(Tok(), [[7, 8, 2, 0, 0], [7, 8, 9]], {2}, token_logps=[[-1.0, -2.0, -0.5, -9.0, -9.0],
                                                                           [-1.0, -1.0, -1.0]])
    assert out.finish_reasons == ["stop", "length"] and out.num_tokens == [2, 3]
    assert out.token_ids == [[7, 8, 2], [7, 8, 9]]
    assert out.logps == [-3.5, -3.0]


def _judge_with(cfg, tmp_path, responses, stats=None, **judge):
    from spa.stages.judge import judge_file

    cfg2 = cfg.model_copy(update={"judge": cfg.judge.model_copy(update=judge)})
    out = tmp_path / f"judgments_{len(list(tmp_path.glob('*')))}.parquet"
    judge_file(cfg2, 1, responses, out, progress=False, stats=stats)
    return read_table(out, "judgments")


def _assert_same_judgments(full, reused):
    assert len(reused) == len(full) and "policy_logps=from_sampling" in reused[0]["judge"]
    for f, r in zip(full, reused, strict=True):
        assert (r["chosen"], r["rejected"], r["tie"]) == (f["chosen"], f["rejected"], f["tie"])
        assert (r["chosen_tokens"], r["rejected_tokens"]) == (f["chosen_tokens"], f["rejected_tokens"])
        assert r["p_chosen"] == pytest.approx(f["p_chosen"], abs=1e-5)
        for col in ("policy_logp_chosen", "policy_logp_rejected", "ref_logp_chosen", "ref_logp_rejected"):
            assert r[col] == pytest.approx(f[col], abs=1e-3), col


def test_judge_reusing_sampled_logps_agrees_with_rescoring(chained, tmp_path):
    """Where the sampled ids are the ids the response text renders to, the reusing judge takes pi_{t-1}'s
    log-probs from sampling and runs only the reference; elsewhere it rescores with pi_{t-1}. Either way it writes
    the labels and numbers of full rescoring."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    full = read_table(lay.judgments(1), "judgments").to_pylist()
    table = pq.read_table(lay.responses(1))
    policy, tok = load_causal_lm(lay.model(0), "float32", "cpu"), load_tokenizer(lay.model(0))
    # (1) the tiny model's own samples: partial UTF-8 bytes, which rarely survive decode + encode
    rows = table.to_pylist()
    expected = sum(response_ids(tok, row["prompt"], y, why == "stop") != ids for row in rows for y, why, ids in
                   zip(row["responses"], row["finish_reasons"], row["token_ids"], strict=True))
    stats = {}
    _assert_same_judgments(full, _judge_with(cfg, tmp_path, lay.responses(1), stats, policy_logps="from_sampling")
                           .to_pylist())
    assert stats == {"responses": 2 * len(rows), "policy_rescored": expected}
    # (2) what an exact sampler records for the rendered ids: nothing is rescored with pi_{t-1}
    ids_col, logp_col = [], []
    for row in rows:
        fins = [r == "stop" for r in row["finish_reasons"]]
        ids_col.append([response_ids(tok, row["prompt"], y, f) for y, f in zip(row["responses"], fins, strict=True)])
        logp_col.append([_dense_logp(policy, tok, row["prompt"], y, f) for y, f in zip(row["responses"], fins,
                                                                                        strict=True)])
    table = table.set_column(table.schema.get_field_index("token_ids"), "token_ids",
                             pa.array(ids_col, table.schema.field("token_ids").type))
    table = table.set_column(table.schema.get_field_index("sampled_logps"), "sampled_logps",
                             pa.array(logp_col, pa.list_(pa.float64())))
    exact = tmp_path / "exact_responses.parquet"
    pq.write_table(table, exact)
    stats = {}
    _assert_same_judgments(full, _judge_with(cfg, tmp_path, exact, stats, policy_logps="from_sampling").to_pylist())
    assert stats == {"responses": 2 * len(rows), "policy_rescored": 0}


def test_judge_reuse_refuses_untrusted_logps(chained, tmp_path):
    """Missing columns or another precision: refused, naming file and row; through the CLI that is exit code 2
    and no judgments file."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from spa.errors import UntrustedSampledLogps

    cfg, _, _ = chained
    lay = RunLayout(cfg.run_dir)
    table = pq.read_table(lay.responses(1))
    bad = {}
    bad["missing"] = table.drop_columns(["token_ids", "sampled_logps", "logp_dtype"])
    bad["precision"] = table.set_column(table.schema.get_field_index("logp_dtype"), "logp_dtype",
                                        pa.array(["bfloat16"] * table.num_rows, pa.string()))
    expected = {"missing": "columns", "precision": "row 0: sampled log-probs were computed in bfloat16"}
    for name, t in bad.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(t, path)
        with pytest.raises(UntrustedSampledLogps, match=expected[name]):
            _judge_with(cfg, tmp_path, path, None, policy_logps="from_sampling")
    # the CLI: one clear line, exit 2, nothing written
    run = tmp_path / "cli"
    (run / "iter_1").mkdir(parents=True)
    cfg_cli = cfg.model_copy(update={"run_dir": str(run)})
    lay_cli = RunLayout(run)
    pq.write_table(bad["precision"], lay_cli.responses(1))
    shutil.copytree(lay.model(0), lay_cli.model(0))
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg_cli.model_dump(mode="json")))
    res = spa("judge", "-c", str(path), "-t", "1", "--set", "judge.policy_logps=from_sampling", check=False)
    assert res.returncode == 2, res.stderr
    assert "bfloat16" in res.stderr and "policy_logps: rescore" in res.stderr
    assert not lay_cli.judgments(1).exists()



def test_the_flow_parses_its_config_once_per_process(tmp_path, tiny_model_dir, prefs_file, monkeypatch):
    """The tasks of a flow read one saved config: parsed once while the file is unchanged, again after it changes."""
    import yaml

    import spa.config
    from spa_tasks.run_config import _parsed, run_config

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    calls = []
    real = spa.config.load_config
    monkeypatch.setattr(spa.config, "load_config", lambda p: calls.append(p) or real(p))
    _parsed.cache_clear()
    assert run_config(str(path)) is run_config(str(path)) and len(calls) == 1
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"iterations": 0}))
    assert run_config(str(path)).iterations == 0 and len(calls) == 2
