"""The verifier in the stages: judge.type verifier (labels), judge.oracle verifier (diagnostics) and the
instruction-following sets of spa evaluate, on the tiny model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.config import parse_config
from spa.errors import ConfigError
from spa.judges.verifier import load_tasks, verify
from spa.run.layout import RunLayout
from spa.stages import evaluate, judge, prepare, sample
from tests.test_data_scripts import _module


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """60 generated tasks (gold-looking pairs on every row, so prepare can draw seed and held-out) and a dev split."""
    vt = _module("verifiable_tasks")
    root = tmp_path_factory.mktemp("tasks")
    rows = vt.make_tasks(60, 0, dev=False)
    for r in rows:
        r["chosen"], r["rejected"] = "A plain answer.", "Another, different answer"
    vt.write_jsonl(rows, root / "tasks.jsonl")
    vt.write_jsonl(vt.make_tasks(6, 1, dev=True), root / "dev.jsonl")
    return root / "tasks.jsonl", root / "dev.jsonl"


def _run(tmp_path, tiny_model_dir, task_files, name, **judge_over):
    tasks, dev = task_files
    n = 4 if judge_over.get("select") == "best_worst" else 2
    cfg = tiny_config(tmp_path / name, tiny_model_dir, tasks, model={"pi_0": str(tiny_model_dir), "max_length": 1024},
                      sample={"n": n, "temperature": 1.5, "max_new_tokens": 16},
                      judge={"instructions": str(tasks), "oracle": "verifier", **judge_over},
                      evaluate={"eval_set": "none", "instruction_sets": [str(dev)], "max_new_tokens": 8})
    prepare.run(cfg)
    sample.run(cfg, 1)
    return cfg, RunLayout(cfg.run_dir)


HAND_WRITTEN = ["a, b", "A plain answer", 'Some "quoted" text.\nP.S. ok', "<<Title>>\n* one\n* two\nAny other questions?"]


def hand_written_responses(lay: RunLayout, t: int) -> None:
    """Replace the sampled texts with hand-written ones (each follows different constraints), rotated per row."""
    import pyarrow as pa

    table = pq.read_table(lay.responses(t))
    k = len(table.column("responses")[0])
    texts = [[HAND_WRITTEN[(i + j) % 4] for j in range(k)] for i in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("responses"), "responses",
                             pa.array(texts, pa.list_(pa.string())))
    pq.write_table(table, lay.responses(t))


@pytest.mark.parametrize("select", ["first_two", "best_worst"])
def test_verifier_labels_by_constraints_followed(tmp_path, tiny_model_dir, task_files, select):
    cfg, lay = _run(tmp_path, tiny_model_dir, task_files, select, type="verifier", select=select, reference="none")
    hand_written_responses(lay, 1)
    summary = judge.run(cfg, 1).summary
    tasks = {t.prompt: t for t in load_tasks(task_files[0])}
    rows = pq.read_table(lay.judgments(1)).to_pylist()
    responses = {r["prompt_id"]: r["responses"] for r in pq.read_table(lay.responses(1)).to_pylist()}
    for row in rows:
        t = tasks[row["prompt"]]
        cands = responses[row["prompt_id"]][: 2 if select == "first_two" else 4]
        scores = [verify(t, y).score for y in cands]
        if row["tie"]:
            assert max(scores) == min(scores) and row["p_chosen"] == 0.5
        else:  # by hand: the best (first of equals) against the worst; a certain preference
            assert verify(t, row["chosen"]).score == max(scores) > verify(t, row["rejected"]).score == min(scores)
            assert row["p_chosen"] == 1.0 and row["judge"].startswith("verifier(tasks.jsonl)")
    assert 0 < summary["ties"] < summary["pairs"]  # both kinds of row were checked
    assert summary["self_label_accuracy"] == 1.0  # the verifier oracle agrees with the verifier judge


def test_implicit_judge_with_the_verifier_oracle(tmp_path, tiny_model_dir, task_files):
    cfg, lay = _run(tmp_path, tiny_model_dir, task_files, "implicit", reference="none")
    hand_written_responses(lay, 1)
    summary = judge.run(cfg, 1).summary
    tasks = {t.prompt: t for t in load_tasks(task_files[0])}
    labelled = [r for r in pq.read_table(lay.judgments(1)).to_pylist() if not r["tie"]]
    verdicts = [v["oracle_verdict"] for v in pq.read_table(lay.oracle_verdicts(1)).to_pylist()]

    def by_hand(r):
        c, w = verify(tasks[r["prompt"]], r["chosen"]).score, verify(tasks[r["prompt"]], r["rejected"]).score
        return 1.0 if c > w else 2.0 if w > c else 1.5

    assert verdicts == [by_hand(r) for r in labelled]
    decided = [v for v in verdicts if v != 1.5]
    assert decided and summary["self_label_accuracy"] == decided.count(1.0) / len(decided)


def test_evaluate_scores_the_instruction_sets(tmp_path, tiny_model_dir, task_files):
    cfg, lay = _run(tmp_path, tiny_model_dir, task_files, "eval")
    evaluate.run(cfg, 0)
    ev = json.loads(lay.eval_summary(0).read_text())
    assert ev["eval_set"] == "none" and ev["n"] == 0 and ev["win_rate"] is None
    got = ev["instruction_following"]["dev"]
    answers = pq.read_table(lay.instruction_answers(0, "dev")).to_pylist()
    dev = load_tasks(task_files[1])
    assert [a["prompt"] for a in answers] == [t.prompt for t in dev] and got["n"] == 6
    verdicts = [verify(t, a["output"]) for t, a in zip(dev, answers, strict=True)]
    assert [list(v.strict) for v in verdicts] == [a["strict"] for a in answers]
    assert got["prompt_loose"] == sum(v.all_loose for v in verdicts) / 6
    n_instr = sum(len(t.instruction_ids) for t in dev)
    assert got["instruction_strict"] == sum(sum(v.strict) for v in verdicts) / n_instr
    # greedy: the same answers when evaluated again
    evaluate.run(cfg, 0, force=True)
    assert pq.read_table(lay.instruction_answers(0, "dev")).column("output").to_pylist() == [a["output"] for a in answers]


def test_verifier_settings_are_checked(tmp_path, tiny_model_dir, task_files):
    raw = tiny_config(tmp_path / "x", tiny_model_dir, task_files[0]).model_dump(mode="json")
    for judge_over, message in (({"type": "verifier"}, "need judge.instructions"),
                                ({"oracle": "verifier"}, "need judge.instructions"),
                                ({"type": "verifier", "instructions": "t.jsonl", "length_penalty": 0.01},
                                 "length_penalty: 0")):
        with pytest.raises(ConfigError, match=message):
            parse_config(raw | {"judge": raw["judge"] | judge_over})
