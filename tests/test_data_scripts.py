"""The data/ scripts: UltraFeedback-shaped and other datasets, built here (nothing from a hub), come out in
the format ``spa prepare`` reads; bad input is one line and exit code 2; the shipped sample prepares."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets  # the dev extra installs it
import pyarrow.parquet as pq
import pytest

from spa.config import load_config, parse_config
from spa.stages import prepare

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SAMPLE = DATA / "sample" / "preferences.jsonl"


def _module(name: str):
    """A data/ script or module imported by path (data/ is not a package; the scripts import ``convert``)."""
    if str(DATA) not in sys.path:
        sys.path.insert(0, str(DATA))
    spec = importlib.util.spec_from_file_location(f"spa_data_{name}", DATA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """``datasets`` caches what it loads: keep that in the test's folder, and offline."""
    import datasets.config

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def uf_rows(n: int, start: int = 0) -> list[dict]:
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized (message lists, scores, an unused column)."""
    rows = []
    for i in range(start, start + n):
        prompt = f"Question {i}: name a colour that starts with the letter {chr(65 + i % 26)}."
        good, bad = f"A fine answer number {i}.", f"no {i}"
        rows.append({
            "prompt": prompt, "prompt_id": f"pid{i:04d}",
            "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
            "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": bad}],
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": good}],
            "score_chosen": 8.0 + i % 2, "score_rejected": 3.5,
        })
    return rows


def run_cli(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it: a fresh interpreter, the script's folder first on sys.path."""
    return subprocess.run([sys.executable, str(DATA / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ}, timeout=300)


@pytest.fixture(autouse=True)
def _tokenizer_model(tiny_model_dir):
    """prepare measures token lengths with pi_init's tokenizer: the tiny model stands in for it."""
    global TOKENIZER_MODEL
    TOKENIZER_MODEL = tiny_model_dir


TOKENIZER_MODEL: Path | None = None


def prepare_run(tmp_path: Path, source: Path, **data):
    """``spa prepare`` (the stage itself) on ``source``; returns (summary, seed rows, prompt set 1 rows)."""
    cfg = parse_config({
        "run_dir": str(tmp_path / "run"), "iterations": len(data["prompt_sizes"]),
        "model": {"pi_init": str(TOKENIZER_MODEL)},
        "data": {"source": str(source), "shuffle_seed": 1, **data},
    })
    result = prepare.run(cfg, echo=lambda *_: None)
    run = Path(cfg.run_dir) / "data"
    return result.summary, pq.read_table(run / "seed.parquet").to_pylist(), pq.read_table(run / "prompts_1.parquet")


def test_ultrafeedback_save_to_disk_copy_to_prepare(tmp_path):
    local = tmp_path / "uf"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(uf_rows(30)),
                          "test_prefs": datasets.Dataset.from_list(uf_rows(5, start=100))}).save_to_disk(str(local))
    out = tmp_path / "out" / "uf.parquet"
    proc = run_cli("prepare_ultrafeedback.py", str(local), "--split", "train_prefs", "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 30 of 30 rows to {out}"
    table = pq.read_table(out)
    assert table.column_names == ["prompt_id", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    first = table.slice(0, 1).to_pylist()[0]
    assert first == {"prompt_id": "pid0000", "prompt": uf_rows(1)[0]["prompt"], "chosen": "A fine answer number 0.",
                     "rejected": "no 0", "score_chosen": 8.0, "score_rejected": 3.5}
    assert not list(out.parent.glob(".*tmp"))  # the atomic write left no temporary file

    summary, seed, prompts = prepare_run(tmp_path, out, seed_size=10, prompt_sizes=[8, 8], heldout_size=4)
    assert (summary["distinct_prompts"], summary["unusable_pairs"], summary["duplicate_prompts"]) == (30, 0, 0)
    assert (len(seed), prompts.num_rows) == (10, 8)
    by_id = {r["prompt_id"]: r for r in table.to_pylist()}
    for row in seed:  # prepare kept the given ids and the converted texts
        src = by_id[row["prompt_id"]]
        assert (row["prompt"], row["chosen"], row["rejected"]) == (src["prompt"], src["chosen"], src["rejected"])


def test_ultrafeedback_hub_file_layout_other_split_jsonl_limit(tmp_path):
    """A folder as `hf download --repo-type dataset` leaves it: data/<split>-00000-of-00001.parquet."""
    (tmp_path / "uf" / "data").mkdir(parents=True)
    for split, rows in (("train_prefs", uf_rows(12)), ("test_prefs", uf_rows(9, start=50))):
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "uf" / "data" / f"{split}-00000-of-00001.parquet"))
    out = tmp_path / "test.jsonl"
    rc = _module("prepare_ultrafeedback").main([str(tmp_path / "uf"), "--split", "test_prefs", "-o", str(out),
                                                "--limit", "5"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"pid{i:04d}" for i in range(50, 55)]
    assert rows[0]["chosen"] == "A fine answer number 50."
    loaded = prepare.load_source(str(out))  # prepare's reader takes the JSONL as written
    assert len(loaded) == 5 and loaded[2]["rejected"] == "no 52"


def test_missing_column_is_one_line_and_exit_2(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in uf_rows(3)]
    src = tmp_path / "bad.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(src))
    out = tmp_path / "out.parquet"
    proc = run_cli("prepare_ultrafeedback.py", str(src), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "missing column(s) 'rejected'" in lines[0]
    assert str(src) in lines[0] and not out.exists()

    proc = run_cli("from_hf_dataset.py", str(src), "-o", str(out), "--rejected-col", "worse", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "missing column(s) 'worse'" in proc.stderr and not out.exists()


def test_missing_dataset_and_bad_row_are_one_line(tmp_path, capsys):
    script = _module("from_hf_dataset")
    assert script.main([str(tmp_path / "nowhere.parquet"), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0]

    src = tmp_path / "rows.jsonl"
    turns = [[{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}],
             [{"role": "user", "content": "q"}]]  # row 1: no assistant turn
    src.write_text("".join(json.dumps({"prompt": "p", "chosen": t, "rejected": "r"}) + "\n" for t in turns))
    assert script.main([str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "column 'chosen' row 1" in err[0] and "assistant turn" in err[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_from_hf_dataset_maps_columns_strings_and_message_lists(tmp_path):
    rows = [{"question": f"How do I do task {i}?", "id": i,
             "good": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"How do I do task {i}?"},
                      {"role": "assistant", "content": "first try"}, {"role": "user", "content": "again"},
                      {"role": "assistant", "content": f"Step by step, task {i}."}],
             "bad": f"Never mind {i}."} for i in range(20)]
    src = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(src))
    script = _module("from_hf_dataset")

    out = tmp_path / "a.parquet"
    assert script.main([str(src), "-o", str(out), "--prompt-col", "question", "--chosen-col", "good",
                        "--rejected-col", "bad", "--id-col", "id"]) == 0
    got = pq.read_table(out).to_pylist()
    assert got[3] == {"prompt_id": "3", "prompt": "How do I do task 3?", "chosen": "Step by step, task 3.",
                      "rejected": "Never mind 3."}  # the last assistant turn; the id as a string

    out = tmp_path / "b.jsonl"  # the prompt taken from the conversation: its first user turn
    assert script.main([str(src), "-o", str(out), "--prompt-col", "good", "--chosen-col", "good",
                        "--rejected-col", "bad"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(got[0]) == {"prompt", "chosen", "rejected"}
    assert got[7]["prompt"] == "How do I do task 7?" and got[7]["chosen"] == "Step by step, task 7."
    summary, seed, _ = prepare_run(tmp_path, out, seed_size=6, prompt_sizes=[6], heldout_size=2)
    assert summary["distinct_prompts"] == 20 and summary["unusable_pairs"] == 0 and len(seed) == 6


def test_message_helpers():
    convert = _module("convert")
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}]
    assert convert.prompt_text(msgs, "c", 0) == "u1"
    assert convert.response_text(msgs, "c", 0) == "a2"
    assert convert.prompt_text("plain", "c", 0) == convert.response_text("plain", "c", 0) == "plain"
    for bad in (None, 3, [], [{"role": "system", "content": "s"}]):
        with pytest.raises(convert.ConversionError, match="row 5"):
            convert.response_text(bad, "c", 5)


def _word_tokenizer(path: Path) -> Path:
    """A local word-level tokenizer with a chat template: one token per word (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<assistant> {% endif %}")
    fast.save_pretrained(path)
    return path


def test_length_budget_keeps_what_the_pipeline_can_take(tmp_path):
    tok = _word_tokenizer(tmp_path / "tok")
    rows = uf_rows(4)
    rows[1]["chosen"][1]["content"] = "word " * 40  # prompt ~12 + 44 > 40: no gold pair, still a prompt
    rows[2]["prompt"] = "long " * 35  # more than 40 - 10 tokens: no room to sample, dropped
    src = tmp_path / "uf.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(src))
    out = tmp_path / "fit.jsonl"
    proc = run_cli("prepare_ultrafeedback.py", str(src), "-o", str(out), "--tokenizer", str(tok),
                   "--max-length", "40", "--max-new-tokens", "10", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 of 4 rows" in proc.stdout
    assert "1 pair too long (kept as prompts only)" in proc.stdout and "1 prompt too long (dropped)" in proc.stdout
    got = {r["prompt_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == ["pid0000", "pid0001", "pid0003"]
    assert got["pid0001"]["chosen"] == got["pid0001"]["rejected"] == ""
    assert got["pid0000"]["chosen"] == "A fine answer number 0."


def test_shipped_sample_prepares_with_the_quickstart_splits(tmp_path):
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 60 and all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"] for r in rows)
    cfg = load_config(ROOT / "configs" / "quickstart_sample.yaml",
                      {"run_dir": str(tmp_path / "run"), "data.source": str(SAMPLE), "model.pi_init": str(TOKENIZER_MODEL)})
    result = prepare.run(cfg, echo=lambda *_: None)
    s = result.summary
    assert (s["rows_in"], s["distinct_prompts"], s["duplicate_prompts"], s["unusable_pairs"]) == (60, 60, 0, 0)
    assert (s["seed"], s["heldout"], s["prompts_1"], s["prompts_2"]) == (20, 10, 15, 15)
    seed = pq.read_table(tmp_path / "run" / "data" / "seed.parquet")
    assert seed.num_rows == 20 and seed.column_names[:4] == ["prompt_id", "prompt", "chosen", "rejected"]
