"""Evaluation: AlpacaEval-style win rates with every annotator kind, offline LC, alignment, MT-Bench.

The API paths talk to a real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions
protocol (a fake judge that prefers the longer output), not to a patched client.
"""

from __future__ import annotations

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.evaluation.eval_sets import ALPACA_EVAL, EvalSet, load_eval_set, load_mt_bench
from spa.evaluation.length_control import OFFLINE, lc_win_rate
from spa.evaluation.scoring import MisalignedOutputs, check_aligned
from spa.run.layout import RunLayout
from spa.stages import evaluate, prepare

SECRET = "sk-test-never-in-a-file-4f1c"
_OUTPUT = re.compile(r'"output": """(.*?)"""', re.S)


def prefer_longer(instruction: str, output_1: str, output_2: str) -> float:
    """A Python annotator for the tests: the longer output wins, equal lengths tie."""
    return 2.0 if len(output_2) > len(output_1) else 1.0 if len(output_1) > len(output_2) else 1.5


def mt_judge(question, turn, answers, reference) -> float:
    return 3.0 if turn == 1 else 8.0


class FakeJudge(BaseHTTPRequestHandler):
    """``POST /v1/chat/completions``: alpaca-eval's classifier prompt gets logprobs preferring the
    longer of the two outputs; any other prompt (MT-Bench grading) gets ``Rating: [[7]]``."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"]
        outputs = _OUTPUT.findall(text)
        if body.get("logprobs") and len(outputs) == 2:
            first_wins = len(outputs[0]) >= len(outputs[1])
            lp = {"m": -0.05 if first_wins else -3.0, "M": -3.0 if first_wins else -0.05}
            best = "m" if first_wins else "M"
            logprobs = {"content": [{"token": best, "logprob": lp[best], "bytes": list(best.encode()),
                                     "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())}
                                                      for k, v in lp.items()]}]}
            content = best
        else:
            logprobs, content = None, "The answer is fine. Rating: [[7]]"
        reply = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                              "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    FakeJudge.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _reference_set(path: Path, n: int = 12) -> Path:
    """Half the reference outputs are long (the reference wins on length), half a single word."""
    rows = [{"instruction": f"Question number {i}: tell me about topic {i}.",
             "output": ("a long and detailed reference answer " * 8) if i % 2 == 0 else "ok",
             "generator": "reference_model"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _run(tmp_path, tiny_model_dir, prefs_file, name="run", **evaluate_section):
    cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file, model={"pi_0": str(tiny_model_dir)},
                      evaluate={"max_new_tokens": 16, **evaluate_section})
    prepare.run(cfg)
    evaluate.run(cfg, 0)
    lay = RunLayout(cfg.run_dir)
    return cfg, lay, json.loads(lay.eval_summary(0).read_text())


# --- pure parts -----------------------------------------------------------------------------


def test_alpaca_eval_and_mt_bench_sets_ship_offline():
    alpaca = load_eval_set(ALPACA_EVAL)
    assert len(alpaca) == 805 and alpaca.reference_generator == "gpt4_1106_preview"
    assert alpaca.instructions[0].startswith("What are the names of some famous actors")
    questions = load_mt_bench()
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    math = [q for q in questions if q.category == "math"]
    assert math and all(q.reference is not None for q in math)  # GPT-4 reference answers for grading


def test_misaligned_or_partial_outputs_are_refused():
    s = EvalSet("x", ["a", "b", "c"], ["ra", "rb", "rc"], "ref")
    check_aligned(["a", "b", "c"], s)
    with pytest.raises(MisalignedOutputs, match="model output 1 answers 'c'"):
        check_aligned(["a", "c", "b"], s)
    with pytest.raises(MisalignedOutputs, match="partial set"):
        check_aligned(["a", "b"], s)


def test_offline_length_control_discounts_a_length_exploit(monkeypatch):
    """A model that wins mostly by being longer: the offline LC win rate is recorded as such and
    lies well below the raw win rate; an equally strong model at equal length is not discounted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(0)
    n = 400
    ins = [f"q{i}" for i in range(n)]
    ref = ["r" * 100] * n
    outs, prefs = [], []
    for _ in range(n):
        longer = rng.random() < 0.7
        outs.append("y" * (300 if longer else 100))
        prefs.append(2.0 if rng.random() < (0.9 if longer else 0.3) else 1.0)
    raw = sum(p == 2.0 for p in prefs) / n * 100
    out = lc_win_rate(ins, ref, outs, prefs, "test", "model", "reference", alpaca_eval_set=True)
    assert out["lc_model"] == OFFLINE and "HF_HUB_OFFLINE" in out["lc_note"]
    assert out["lc_win_rate"] < raw - 15, (out, raw)
    assert out["lc_win_rate"] == pytest.approx(30, abs=8)  # the win rate at equal length
    few = lc_win_rate(ins[:5], ref[:5], outs[:5], prefs[:5], "test", "model", "reference", alpaca_eval_set=False)
    assert few["lc_win_rate"] is None and "too few" in few["lc_note"]


# --- the evaluate stage ---------------------------------------------------------------------


def test_function_annotator_end_to_end(tmp_path, tiny_model_dir, prefs_file):
    from alpaca_eval import utils as ae_utils

    ref = _reference_set(tmp_path / "ref.json")
    cfg, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, eval_set=str(ref), max_prompts=None,
                             annotator="python:test_evaluation:prefer_longer")
    table = pq.read_table(lay.eval_table(0)).to_pylist()
    assert len(table) == 12 and summary["n"] == 12 and "eval_set_size" not in summary
    for row in table:  # the annotator saw the reference as output_1 and the model as output_2
        assert row["preference"] == prefer_longer(row["instruction"], row["reference_output"], row["output"])
    wins = sum(r["preference"] == 2.0 for r in table) + 0.5 * sum(r["preference"] == 1.5 for r in table)
    assert summary["win_rate"] == pytest.approx(100 * wins / 12)
    assert summary["lc_model"] == OFFLINE and summary["lc_win_rate"] is not None
    assert summary["annotator"] == "python:test_evaluation:prefer_longer"
    assert summary["gold_agreement"] is not None and summary["avg_length"] > 0
    # model_outputs.json is alpaca-eval's format: its own loader reads it
    df = ae_utils.load_or_convert_to_dataframe(lay.iteration(0) / "model_outputs.json")
    assert list(df["instruction"]) == [r["instruction"] for r in table]
    assert set(df["generator"]) == {"spa_iter_0"}
    # the report's evaluation table (Table 1's columns) shows this iteration's numbers
    from spa.stages.report import build_report

    report = build_report(cfg)
    assert "## Evaluation" in report and "| pi_0 (seed DPO) | " in report
    assert f"{summary['win_rate']:.2f} ± {summary['standard_error']:.2f}" in report


def test_max_prompts_answers_a_subset_of_an_eval_set_and_says_so(tmp_path, tiny_model_dir, prefs_file):
    """evaluate.max_prompts holds for reference sets too (it used to apply to the held-out prompts only): the
    first N instructions with their own reference outputs, marked as a subset in eval.json and the report."""
    from spa.stages.report import build_report

    ref = _reference_set(tmp_path / "ref.json")
    cfg, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, eval_set=str(ref), max_prompts=5,
                             annotator="python:test_evaluation:prefer_longer")
    table = pq.read_table(lay.eval_table(0)).to_pylist()
    full = json.loads(ref.read_text())
    assert summary["n"] == len(table) == 5 and summary["eval_set_size"] == len(full) == 12
    assert [r["instruction"] for r in table] == [r["instruction"] for r in full[:5]]
    assert [r["reference_output"] for r in table] == [r["output"] for r in full[:5]]
    assert "(n=5 of 12, a subset)" in build_report(cfg)


def test_a_missing_eval_set_names_its_config_key_and_path(tmp_path, tiny_model_dir, prefs_file):
    """evaluate.eval_set is a file the user gives, which no stage writes: the error says so, not "run prepare"."""
    from spa.errors import EvalSetError

    missing = tmp_path / "no_such_eval.jsonl"
    with pytest.raises(EvalSetError, match=rf"evaluate.eval_set: {re.escape(str(missing))} does not exist; give a "):
        _run(tmp_path, tiny_model_dir, prefs_file, eval_set=str(missing))
    assert not RunLayout(tmp_path / "run").eval_summary(0).exists()


def test_no_annotator_available_still_writes_outputs(tmp_path, tiny_model_dir, prefs_file, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ref = _reference_set(tmp_path / "ref.json")
    _, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, eval_set=str(ref), max_prompts=None,
                           annotator="alpaca_eval:weighted_alpaca_eval_gpt4_turbo")
    assert summary["win_rate"] is None and "$OPENAI_API_KEY" in summary["win_rate_note"]
    assert "OPENAI_API_KEY" in capsys.readouterr().out
    assert pq.read_table(lay.eval_table(0)).num_rows == 12
    assert len(json.loads((lay.iteration(0) / "model_outputs.json").read_text())) == 12


def test_api_annotator_through_a_local_openai_compatible_server(tmp_path, tiny_model_dir, prefs_file, judge_server,
                                                                 monkeypatch):
    from alpaca_eval.main import evaluate as alpaca_evaluate

    monkeypatch.setenv("JUDGE_KEY", SECRET)
    ref = _reference_set(tmp_path / "ref.json")
    endpoint = {"base_url": judge_server, "model": "judge-model", "api_key_env": "JUDGE_KEY"}
    _, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, eval_set=str(ref), max_prompts=None,
                           annotator="alpaca_eval:weighted_alpaca_eval_gpt4_turbo", judge_endpoint=endpoint)
    judged = [r for r in FakeJudge.requests if r["body"].get("logprobs")]
    assert len(judged) == 12
    assert {r["auth"] for r in judged} == {f"Bearer {SECRET}"}
    assert {r["body"]["model"] for r in judged} == {"judge-model"} and {r["path"] for r in judged} == {"/v1/chat/completions"}
    table = pq.read_table(lay.eval_table(0)).to_pylist()
    for row in table:  # the fake judge prefers the longer output; alpaca-eval undid its shuffling
        model_longer = len(row["output"].strip()) > len(row["reference_output"].strip())
        assert (row["preference"] > 1.5) == model_longer, row
    assert summary["win_rate"] is not None and summary["annotator"] == "alpaca_eval:weighted_alpaca_eval_gpt4_turbo"
    # the key is read from the environment at request time: no file of the run holds it
    for path in Path(lay.root).rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # alpaca-eval's own entry point accepts our model_outputs.json against the same reference file
    client_config = tmp_path / "client.yaml"
    client_config.write_text(f"default:\n  - client_class: spa.evaluation.annotators.EnvKeyOpenAI\n"
                             f"    api_key_env: JUDGE_KEY\n    base_url: {judge_server}\n")
    leaderboard, annotations = alpaca_evaluate(
        model_outputs=str(lay.iteration(0) / "model_outputs.json"), reference_outputs=str(ref),
        annotators_config="weighted_alpaca_eval_gpt4_turbo", fn_metric="get_winrate", sort_by="win_rate", output_path=None,
        is_return_instead_of_print=True, precomputed_leaderboard=None, caching_path=None,
        annotation_kwargs={"client_config_path": str(client_config)})
    assert leaderboard.loc["spa_iter_0", "win_rate"] == pytest.approx(summary["win_rate"])


def test_mt_bench_two_turns_graded_by_python_and_api_judges(tmp_path, tiny_model_dir, prefs_file, judge_server,
                                                             monkeypatch):
    questions = tmp_path / "question.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "writing", "turns": ["Write a line.", "Now shorter."]},
        {"question_id": 2, "category": "math", "turns": ["What is 2+2?", "And 3+3?"], "reference": ["4", "6"]},
    ]))
    base = {"eval_set": "heldout"}
    _, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, name="py", **base, mt_bench={
        "enabled": True, "questions": str(questions), "judge": "python:test_evaluation:mt_judge", "max_new_tokens": 8})
    rows = pq.read_table(lay.iteration(0) / "mt_bench.parquet").to_pylist()
    assert [r["question_id"] for r in rows] == [1, 2] and all(isinstance(r["turn_2"], str) for r in rows)
    assert summary["mt_bench"]["turn_1"] == 3.0 and summary["mt_bench"]["turn_2"] == 8.0
    assert summary["mt_bench"]["score"] == pytest.approx(5.5)

    monkeypatch.setenv("JUDGE_KEY", SECRET)
    _, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, name="api", **base, mt_bench={
        "enabled": True, "questions": str(questions), "judge": "openai:judge-model", "max_new_tokens": 8},
        judge_endpoint={"base_url": judge_server, "api_key_env": "JUDGE_KEY"})
    assert summary["mt_bench"]["score"] == 7.0
    graded = [r["body"]["messages"] for r in FakeJudge.requests]
    assert len(graded) == 4
    assert any("[The Start of Reference Answer]\n4" in m[-1]["content"] for m in graded)  # math uses the reference

    _, lay, summary = _run(tmp_path, tiny_model_dir, prefs_file, name="none", **base, mt_bench={
        "enabled": True, "questions": str(questions), "max_new_tokens": 8})
    assert summary["mt_bench"]["score"] is None and "grading skipped" in summary["mt_bench"]["note"]
    assert pq.read_table(lay.iteration(0) / "mt_bench.parquet").num_rows == 2


def test_evaluation_samples_with_the_sampling_stage_settings_unless_it_sets_top_p(tmp_path):
    """evaluate.top_p (when set) overrides sample.top_p for the evaluation answers only; unset, nothing changes,
    and the resolved config does not even name it (resume keys of existing runs stay the same)."""
    from spa.stages.evaluate import eval_sampling_spec

    cfg = tiny_config(tmp_path, tmp_path / "m", tmp_path / "p.jsonl", sample={"top_p": 0.9, "max_new_tokens": 12},
                      evaluate={"temperature": 0.5})
    spec = eval_sampling_spec(cfg)
    assert (spec.n, spec.top_p, spec.temperature) == (1, 0.9, 0.5)
    assert "top_p" not in cfg.model_dump()["evaluate"]
    cfg = tiny_config(tmp_path, tmp_path / "m", tmp_path / "p.jsonl", sample={"top_p": 0.9},
                      evaluate={"top_p": 1.0})
    assert eval_sampling_spec(cfg).top_p == 1.0 and cfg.model_dump()["evaluate"]["top_p"] == 1.0
