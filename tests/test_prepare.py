import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.data import sources
from spa.data.sources import normalise_prompt, prompt_hash
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.run.stage_runner import StageInputError
from spa.stages import prepare


def test_prompt_hash_is_normalised():
    assert prompt_hash("Hello   World\n") == prompt_hash("hello world")
    assert normalise_prompt("  A\tB ") == "a b"
    assert len(prompt_hash("x")) == 16


def test_splits_are_disjoint_sized_and_reported(tmp_path, tiny_model_dir, prefs_file):
    src = tmp_path / "p.jsonl"
    lines = prefs_file.read_text().splitlines()
    dup = json.loads(lines[0])
    dup["prompt"] = "  " + dup["prompt"].upper() + "  "  # same prompt after normalisation
    extra = [json.dumps(dup), json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"})]
    src.write_text("\n".join(lines + extra) + "\n")
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, src, iterations=2, data={"prompt_sizes": [10, 0.2]})
    res = prepare.run(cfg)
    s = res.summary
    assert (s["duplicate_prompts"], s["empty_prompts"], s["distinct_prompts"]) == (1, 1, 60)
    lay = RunLayout(cfg.run_dir)
    seed, held = read_table(lay.seed, "seed"), read_table(lay.heldout, "heldout")
    p1, p2 = read_table(lay.prompts(1), "prompts"), read_table(lay.prompts(2), "prompts")
    assert (seed.num_rows, held.num_rows, p1.num_rows, p2.num_rows) == (16, 8, 10, 12)
    sets = [set(map(prompt_hash, t.column("prompt").to_pylist())) for t in (seed, held, p1, p2)]
    assert sum(len(x) for x in sets) == len(set().union(*sets))
    assert p1.column_names == ["prompt_id", "prompt"]


def test_split_is_seeded(tmp_path, tiny_model_dir, prefs_file):
    ids = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file, data={"shuffle_seed": seed})
        prepare.run(cfg)
        ids.append(read_table(RunLayout(cfg.run_dir).seed, "seed").column("prompt_id").to_pylist())
    assert ids[0] == ids[1] != ids[2]


def test_ultrafeedback_message_layout(tmp_path, tiny_model_dir):
    rows = [
        {"prompt": f"question {i}?",
         "chosen": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"good {i}"}],
         "rejected": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"bad {i}"}]}
        for i in range(40)
    ]
    src = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, src)
    prepare.run(cfg)
    seed = read_table(RunLayout(cfg.run_dir).seed, "seed").to_pylist()
    assert all(r["chosen"].startswith("good") and r["rejected"].startswith("bad") for r in seed)


def test_not_enough_data_is_a_clear_error(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, data={"prompt_sizes": [1000]})
    with pytest.raises(StageInputError, match=r"need 1024"):
        prepare.run(cfg)
    assert not (tmp_path / "run" / "data").exists() or not list((tmp_path / "run" / "data").iterdir())


def test_missing_source(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, tmp_path / "nope.jsonl")
    with pytest.raises(StageInputError, match="no such data file"):
        prepare.run(cfg)


def test_rerun_is_a_no_op_and_changed_config_reruns(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    assert not prepare.run(cfg).skipped
    assert prepare.run(cfg).skipped
    cfg2 = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, data={"shuffle_seed": 7})
    assert not prepare.run(cfg2).skipped
    # a damaged output makes the stage run again
    (RunLayout(cfg2.run_dir).seed).write_bytes(b"broken")
    assert not prepare.run(cfg2).skipped


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_streamed_batches_do_not_change_the_splits(tmp_path, tiny_model_dir, prefs_file, monkeypatch, suffix):
    """prepare streams the source twice (index, then write); batch boundaries must not matter."""
    rows = [json.loads(line) for line in prefs_file.read_text().splitlines()]
    rows += [rows[3] | {"prompt": rows[3]["prompt"].upper()}, {"prompt": "", "chosen": "a", "rejected": "b"}]
    src = tmp_path / f"src{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), src)
    else:
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = []
    for batch in (4096, 3):
        monkeypatch.setattr(sources, "BATCH_ROWS", batch)
        cfg = tiny_config(tmp_path / f"run{batch}", tiny_model_dir, src, iterations=2, data={"prompt_sizes": [10, 7]})
        res = prepare.run(cfg)
        assert (res.summary["duplicate_prompts"], res.summary["empty_prompts"]) == (1, 1)
        lay = RunLayout(cfg.run_dir)
        outputs.append([read_table(p, k).to_pylist() for p, k in ((lay.seed, "seed"), (lay.heldout, "heldout"),
                                                                  (lay.prompts(1), "prompts"),
                                                                  (lay.prompts(2), "prompts"))])
    assert outputs[0] == outputs[1]
    assert [len(x) for x in outputs[0]] == [16, 8, 10, 7]


def test_one_prompt_id_for_two_prompts_is_an_error(tmp_path, tiny_model_dir, prefs_file):
    rows = [json.loads(line) | {"prompt_id": f"id{i % 30}"} for i, line in enumerate(prefs_file.read_text().splitlines())]
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, src)
    with pytest.raises(StageInputError, match=r"rows 0 and 30 have different prompts but the same prompt_id"):
        prepare.run(cfg)
    assert not (tmp_path / "run" / "data").exists() or not list((tmp_path / "run" / "data").iterdir())


# --- token lengths (data.overlong) ---------------------------------------------------------------------------


def _rows(prefs_file):
    return [json.loads(line) for line in prefs_file.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _long(n_words, start=0):
    from conftest import WORDS

    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words))


def _tok(tiny_model_dir):
    from spa.models.rendering import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _pair_len(tok, prompt, chosen, rejected):
    from spa.models.logprobs import encode_pair

    return max(len(encode_pair(tok, prompt, y).input_ids) for y in (chosen, rejected))


def test_overlong_rows_are_dropped_counted_and_named(tmp_path, tiny_model_dir, prefs_file):
    from spa.models.rendering import prompt_ids

    rows = _rows(prefs_file)
    long_prompt = {f"lp{i}": {"prompt_id": f"lp{i}", "prompt": _long(120, i), "chosen": "yes", "rejected": "no"}
                   for i in range(4)}  # over 256 - 128 for sampling, but a seed pair that fits 256
    long_pair = {f"lc{i}": {"prompt_id": f"lc{i}", "prompt": f"short {i}?", "chosen": _long(300, i), "rejected": "no"}
                 for i in range(4)}  # a prompt that fits, a pair that does not
    src = _write(tmp_path / "long.jsonl", rows[:30] + list(long_prompt.values()) + rows[30:] + list(long_pair.values()))
    echoed = []
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, src, sample={"max_new_tokens": 128},
                      data={"seed_size": 20, "prompt_sizes": [30], "heldout_size": 8})
    s = prepare.run(cfg, echo=echoed.append).summary
    lay, tok = RunLayout(cfg.run_dir), _tok(tiny_model_dir)
    seed, held, p1 = (read_table(p, k).to_pylist() for p, k in ((lay.seed, "seed"), (lay.heldout, "heldout"),
                                                                (lay.prompts(1), "prompts")))
    assert (len(seed), len(held), len(p1)) == (20, 8, 30)  # dropped rows were replaced
    assert all(len(prompt_ids(tok, r["prompt"])) <= 128 for r in p1)
    assert all(_pair_len(tok, r["prompt"], r["chosen"], r["rejected"]) <= 256 for r in seed + held)
    assert s["overlong_prompts"] >= 1 and s["overlong_pairs"] >= 1
    assert s["overlong_prompts"] == len(s["overlong_prompt_ids"]) and s["overlong_pairs"] == len(s["overlong_pair_ids"])
    assert set(s["overlong_prompt_ids"]) <= set(long_prompt) and set(s["overlong_pair_ids"]) <= set(long_pair)
    # each kind is kept out of the role it does not fit, and may serve in the other one
    assert not {r["prompt_id"] for r in p1} & set(long_prompt)
    assert not {r["prompt_id"] for r in seed + held} & set(long_pair)
    line = next(m for m in echoed if "overlong" in m)
    assert s["overlong_prompt_ids"][0] in line and s["overlong_pair_ids"][0] in line
    assert json.loads(lay.manifest.read_text())["stages"]["prepare"]["summary"]["overlong_pairs"] == s["overlong_pairs"]


def test_a_prompt_of_exactly_the_room_is_kept_and_one_token_more_is_refused(tmp_path, tiny_model_dir, prefs_file):
    from spa.models.rendering import prompt_ids

    rows = _rows(prefs_file)
    edge = {"prompt_id": "edge", "prompt": _long(60), "chosen": "same", "rejected": "same"}  # only usable as a prompt
    src = _write(tmp_path / "edge.jsonl", rows + [edge])  # 61 rows: 16 + 8 + 37 draws every one of them
    room = len(prompt_ids(_tok(tiny_model_dir), edge["prompt"]))
    fits = tiny_config(tmp_path / "a", tiny_model_dir, src, model={"max_length": room + 12}, data={"prompt_sizes": [37]})
    s = prepare.run(fits).summary
    assert s["overlong_prompts"] == 0 and "edge" in read_table(RunLayout(fits.run_dir).prompts(1), "prompts")["prompt_id"].to_pylist()
    over = tiny_config(tmp_path / "b", tiny_model_dir, src, model={"max_length": room + 11},
                       data={"prompt_sizes": [37], "overlong": "fail"})
    with pytest.raises(StageInputError, match=rf"{re.escape(str(src))}: row 60 \(prompt_id 'edge'\): the prompt is {room} tokens"):
        prepare.run(over)
    assert not (tmp_path / "b" / "data").exists() or not list((tmp_path / "b" / "data").iterdir())
    dropped = tiny_config(tmp_path / "c", tiny_model_dir, src, model={"max_length": room + 11}, data={"prompt_sizes": [37]})
    with pytest.raises(StageInputError, match=r"1 of them over the token limit"):
        prepare.run(dropped)  # the one row it needs is too long: the count says why


def test_a_pair_of_exactly_max_length_is_kept_and_one_token_more_is_refused(tmp_path, tiny_model_dir, prefs_file):
    rows = _rows(prefs_file)
    for r in rows[24:]:
        r["rejected"] = r["chosen"]  # only the first 24 rows are usable pairs: seed 16 + held-out 8 take all
    rows[5]["chosen"] = _long(120)
    src = _write(tmp_path / "pairs.jsonl", rows)
    length = _pair_len(_tok(tiny_model_dir), rows[5]["prompt"], rows[5]["chosen"], rows[5]["rejected"])
    fits = tiny_config(tmp_path / "a", tiny_model_dir, src, model={"max_length": length})
    assert prepare.run(fits).summary["overlong_pairs"] == 0
    over = tiny_config(tmp_path / "b", tiny_model_dir, src, model={"max_length": length - 1}, data={"overlong": "fail"})
    with pytest.raises(StageInputError, match=rf"row 5 \(prompt_id '\w+'\): prompt \+ chosen response are {length} tokens, "
                                              rf"over model.max_length = {length - 1}"):
        prepare.run(over)


def test_a_seed_pair_too_long_for_the_seed_stage_is_named_by_its_source_row(tmp_path, tiny_model_dir, prefs_file):
    """prepare records each seed and held-out pair's source row; the seed stage, run with a shorter context than
    prepare measured with, names an overlong pair by the source file and row, not by its place in the shuffle."""
    from spa.errors import SequenceTooLongError
    from spa.stages import train

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    prepare.run(cfg)
    lay, source = RunLayout(cfg.run_dir), _rows(prefs_file)
    seed, held = read_table(lay.seed, "seed").to_pylist(), read_table(lay.heldout, "heldout").to_pylist()
    assert all(source[r["source_row"]]["prompt"] == r["prompt"] for r in seed + held)
    tok = _tok(tiny_model_dir)
    lengths = [_pair_len(tok, r["prompt"], r["chosen"], r["rejected"]) for r in seed]
    first = lengths.index(max(lengths))  # the first pair the seed stage refuses at max_length - 1
    row, pid = seed[first]["source_row"], seed[first]["prompt_id"]
    assert row != first  # the shuffle moved it: its seed-set index would name another source row
    short = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, model={"max_length": max(lengths) - 1})
    with pytest.raises(SequenceTooLongError,
                       match=rf"^{re.escape(str(prefs_file))} row {row} \(prompt_id '{pid}', seed pair {first}\): prompt"):
        train.run(short, 0)


def test_only_drawn_rows_are_measured_and_a_skipped_rerun_loads_no_tokenizer(tmp_path, tiny_model_dir, prefs_file,
                                                                            monkeypatch):
    from spa.data import overlong
    from spa.models import logprobs, rendering

    calls = {"prompts": 0, "encode_pair": 0, "prompt_ids": 0}

    def counting(name, fn, size=lambda *a: 1):
        def wrapped(*a, **k):
            calls[name] += size(*a)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(overlong.Overlong, "_prompts", counting("prompts", overlong.Overlong._prompts,
                                                                lambda _self, rows: len(rows)))
    monkeypatch.setattr(logprobs, "encode_pair", counting("encode_pair", logprobs.encode_pair))
    monkeypatch.setattr(rendering, "prompt_ids", counting("prompt_ids", rendering.prompt_ids))
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)  # 60 rows; draws 16 + 8 pairs, 16 prompts
    prepare.run(cfg)
    # prompts: one batch count each, none near the room so none counted again; pairs: both sides rendered
    assert calls == {"prompts": 16, "encode_pair": 2 * (16 + 8), "prompt_ids": 0}

    def no_tokenizer(*_a, **_k):
        raise AssertionError("an up-to-date prepare loaded the tokenizer")

    monkeypatch.setattr(rendering, "load_tokenizer", no_tokenizer)
    assert prepare.run(cfg).skipped


@pytest.mark.parametrize("kind", ["tiny", "tiny_tokenizer_adds_bos", "mistral"])
def test_the_batch_count_screen_never_clears_a_prompt_prompt_ids_refuses(tmp_path, tiny_model_dir, prefs_file, kind):
    """prepare counts prompts as a batch and trusts a count + 1 within the room; ``prompt_ids`` (one BOS) is
    never longer than that, whether the chat template writes the BOS (tiny) or the tokenizer adds it (Mistral)."""
    import gzip
    import shutil

    from spa.models.rendering import load_tokenizer, prompt_ids, prompt_text

    model = tiny_model_dir
    if kind == "tiny_tokenizer_adds_bos":  # Llama/Mistral-style: the tokenizer adds the BOS, the template does not
        from tokenizers import Tokenizer, processors

        model = shutil.copytree(tiny_model_dir, tmp_path / "model")
        jinja = model / "chat_template.jinja"
        jinja.write_text(jinja.read_text().replace("{{ bos_token }}", ""))
        raw = Tokenizer.from_file(str(model / "tokenizer.json"))
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", raw.token_to_id("<s>"))])
        raw.save(str(model / "tokenizer.json"))
    elif kind == "mistral":  # Mistral-7B v0.1's tokenizer with Zephyr's template (tests/test_real_tokens.py)
        asset, model = Path(__file__).parent / "assets" / "zephyr_tokenizer", tmp_path / "mistral"
        model.mkdir()
        with gzip.open(asset / "tokenizer.json.gz", "rb") as src, open(model / "tokenizer.json", "wb") as dst:
            shutil.copyfileobj(src, dst)
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(asset / name, model / name)
    tok = load_tokenizer(model)
    prompts = [r["prompt"] for r in _rows(prefs_file)] + [_long(n) for n in (1, 7, 60)]
    batch = tok([prompt_text(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]
    exact = [len(prompt_ids(tok, p)) for p in prompts]
    assert all(n <= len(ids) + 1 for n, ids in zip(exact, batch, strict=True))
    assert (exact[0] == len(batch[0]) + 1) == (kind != "tiny")  # the tight case is covered
    # and the stage on a prompt at exactly the room, then one over, in this template
    edge = {"prompt_id": "edge", "prompt": _long(60), "chosen": "same", "rejected": "same"}
    src = _write(tmp_path / "edge.jsonl", _rows(prefs_file) + [edge])
    kept = tiny_config(tmp_path / "a", model, src, model={"max_length": exact[-1] + 12}, data={"prompt_sizes": [37]})
    assert "edge" in read_table(prepare.run(kept).outputs[2], "prompts")["prompt_id"].to_pylist()
    over = tiny_config(tmp_path / "b", model, src, model={"max_length": exact[-1] + 11},
                       data={"prompt_sizes": [37], "overlong": "fail"})
    with pytest.raises(StageInputError, match=rf"row 60 \(prompt_id 'edge'\): the prompt is {exact[-1]} tokens"):
        prepare.run(over)


def test_the_token_limits_are_part_of_the_resume_key(tmp_path, tiny_model_dir, prefs_file):
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    assert not prepare.run(cfg).skipped
    assert prepare.run(cfg).skipped
    assert not prepare.run(tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, model={"max_length": 200})).skipped
    assert not prepare.run(tiny_config(tmp_path / "run", tiny_model_dir, prefs_file, model={"max_length": 200},
                                       sample={"max_new_tokens": 20})).skipped


def test_broken_sources_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n[1, 2]\n')
    with pytest.raises(StageInputError, match=rf"{re.escape(str(bad))}: line 3: expected a JSON object"):
        prepare.load_source(str(bad))
    bad.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(StageInputError, match=rf"{re.escape(str(bad))}: line 2: not UTF-8 text"):
        prepare.load_source(str(bad))
    arr = tmp_path / "bad.json"
    arr.write_text('[\n{"prompt": "a"},\n{"prompt": \n')
    with pytest.raises(StageInputError, match=rf"{re.escape(str(arr))}: line 4, column 1: not valid JSON"):
        prepare.load_source(str(arr))
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(StageInputError, match=rf"{re.escape(str(fake))}: not a readable Parquet file"):
        prepare.load_source(str(fake))
