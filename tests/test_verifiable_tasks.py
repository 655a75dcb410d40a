"""data/verifiable_tasks.py (the task source) and spa gold-pairs' labelling, without a model where one is not needed."""

import json
import re

import pytest
from typer.testing import CliRunner

from spa.data.sources import normalise_prompt
from spa.evaluation.instruction_sets import ifeval_path
from spa.judges.gold_pairs import GoldPlan, best_worst, build_gold_source, gold_rows, labelled_order
from spa.judges.verifier import NEEDS_NLTK_DATA, checkable, load_tasks, parse_task, verify
from tests.test_data_scripts import _module


@pytest.fixture(scope="module")
def vt():
    return _module("verifiable_tasks")


def test_tasks_are_valid_checkable_and_seeded(vt):
    rows = vt.make_tasks(300, seed=3, dev=False)
    assert rows == vt.make_tasks(300, seed=3, dev=False) and rows != vt.make_tasks(300, seed=4, dev=False)
    tasks = [parse_task(r, f"row {i}") for i, r in enumerate(rows)]  # every row passes the verifier's validation
    assert all(checkable(t) for t in tasks)
    assert all(1 <= len(t.instruction_ids) <= 3 for t in tasks)
    used = {i for t in tasks for i in t.instruction_ids}
    assert not used & (NEEDS_NLTK_DATA | {"language:response_language"})
    assert len(used) >= 18  # the constraints are drawn from (nearly) the whole offline registry
    assert len({r["prompt"] for r in rows}) == 300
    assert all(r["chosen"] == r["rejected"] == "" for r in rows)  # prompt rows of the source format


def test_a_prompt_states_what_its_verifier_checks(vt):
    """The description in the prompt is built by the same instruction class from the same arguments."""
    for row in vt.make_tasks(50, seed=0, dev=False):
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            if instruction_id == "startend:end_checker":
                assert kwargs["end_phrase"] in row["prompt"]
            if instruction_id == "detectable_format:number_bullet_lists":
                assert f"exactly {kwargs['num_bullets']} bullet points" in row["prompt"]


def test_no_ifeval_prompt_is_used(vt):
    ifeval = [json.loads(line)["prompt"] for line in ifeval_path().read_text().splitlines() if line.strip()]
    assert len(ifeval) == 541
    normalised = [normalise_prompt(p) for p in ifeval]
    requests = {normalise_prompt(r) for r in vt.base_requests()}
    assert not any(r in p for r in requests for p in normalised)
    generated = {normalise_prompt(r["prompt"]) for r in vt.make_tasks(2000, 0, dev=False) + vt.make_tasks(300, 1, dev=True)}
    assert not generated & set(normalised)


def test_dev_split_never_shares_a_base_request(vt):
    train, dev = vt.make_tasks(400, 0, dev=False), vt.make_tasks(100, 1, dev=True)
    requests = vt.base_requests()

    def request_of(prompt):
        return next(r for r in requests if prompt.startswith(r))

    assert not {request_of(r["prompt"]) for r in train} & {request_of(r["prompt"]) for r in dev}


def test_script_writes_both_files(vt, tmp_path):
    assert vt.main(["--out", str(tmp_path / "t.jsonl"), "--dev", str(tmp_path / "d.jsonl"), "--n", "20",
                    "--n-dev", "5"]) == 0
    assert len(load_tasks(tmp_path / "t.jsonl")) == 20 and len(load_tasks(tmp_path / "d.jsonl")) == 5


def test_best_worst():
    assert best_worst([0.5, 1.0, 0.0, 1.0], ["a", "b", "c", "d"]) == (1, 2)  # the first of equals
    assert best_worst([0.5, 0.5], ["a", "b"]) is None  # every answer scores the same: a tie
    assert best_worst([1.0, 0.0], ["same", "same"]) is None


def test_gold_rows_by_hand(tmp_path):
    tasks = [parse_task({"prompt": f"Task {i}.", "instruction_id_list": ["punctuation:no_comma"], "key": f"k{i}"},
                        "t") for i in range(4)]
    order = labelled_order(tasks, 0)
    answers = [["a, b", "a b"], ["x y", "x z"]]  # the first labelled prompt: a pair; the second: a tie
    rows, counts = gold_rows(tasks, order, answers, GoldPlan(prompts=2, samples=2))
    assert [r["prompt"] for r in rows] == [tasks[int(i)].prompt for i in order]
    assert (rows[0]["chosen"], rows[0]["rejected"], rows[0]["chosen_score"]) == ("a b", "a, b", 1.0)
    assert rows[1]["chosen"] == rows[1]["rejected"] == ""
    assert all(r["chosen"] == "" for r in rows[2:]) and rows[0]["prompt_id"] == tasks[int(order[0])].key
    assert (counts["pairs"], counts["ties_dropped"], counts["labelled_prompts"]) == (1, 1, 2)
    assert counts["mean_chosen_score"] == 1.0 and counts["mean_rejected_score"] == 0.0


def _gold_config(tmp_path, tasks_path, pi_init):
    from tests.conftest import tiny_config

    return tiny_config(tmp_path / "run", pi_init, tmp_path / "gold.jsonl", model={"max_length": 1024},
                       sample={"backend": "transformers"},
                       judge={"instructions": str(tasks_path), "oracle": "verifier"})


def test_build_gold_source_samples_once(tmp_path, tiny_model_dir, vt, monkeypatch):
    tasks_path = tmp_path / "tasks.jsonl"
    vt.write_jsonl(vt.make_tasks(12, 0, dev=False), tasks_path)
    cfg = _gold_config(tmp_path, tasks_path, tiny_model_dir)
    counts = build_gold_source(cfg, GoldPlan(prompts=6, samples=3), echo=lambda _: None)
    rows = [json.loads(line) for line in (tmp_path / "gold.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and counts["pairs"] + counts["ties_dropped"] == 6
    assert sum(bool(r["chosen"]) for r in rows) == counts["pairs"]
    for r in rows[:6]:
        if r["chosen"]:
            t = parse_task(r, "row")
            assert verify(t, r["chosen"]).score > verify(t, r["rejected"]).score
    # a rerun reuses the kept samples: no model is loaded
    monkeypatch.setattr("spa.models.remote_sampling.sampler_for", lambda *a: pytest.fail("sampled again"))
    assert build_gold_source(cfg, GoldPlan(prompts=6, samples=3), echo=lambda _: None) == counts


def test_gold_pairs_command_refuses_a_bad_task_file(tmp_path, tiny_model_dir):
    from spa_tasks.cli import app

    tasks_path = tmp_path / "tasks.jsonl"
    tasks_path.write_text(json.dumps({"prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"]}) + "\n"
                          + json.dumps({"prompt": "Yo.", "instruction_id_list": ["made:up"], "kwargs": [{}]}) + "\n")
    cfg = _gold_config(tmp_path, tasks_path, tiny_model_dir)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["gold-pairs", str(config), "--prompts", "1"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and re.search(r"tasks\.jsonl: row 1: unknown instruction id 'made:up'", lines[0])
    assert not (tmp_path / "gold.jsonl").exists()
