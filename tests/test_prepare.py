import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.stages import prepare
from spa.stages.prepare import normalise_prompt, prompt_hash
from spa.stages.runner import StageInputError


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
        monkeypatch.setattr(prepare, "BATCH_ROWS", batch)
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
