import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spa.run.artifacts import (
    ArtifactError,
    atomic_path,
    file_sha256,
    iter_batches,
    num_rows,
    read_table,
    write_table,
)


def pairs(**over):
    cols = {
        "prompt_id": ["a", "b", "c"],
        "prompt": ["p1", "p2", "p3"],
        "chosen": ["good", "fine", "yes"],
        "rejected": ["bad", "meh", "no"],
    }
    cols.update(over)
    return pa.table(cols)


def test_roundtrip_and_extra_columns_kept(tmp_path):
    t = pairs(extra=[1, 2, 3])
    path = write_table(t, tmp_path / "seed.parquet", "seed")
    back = read_table(path, "seed")
    assert back.column_names[:4] == ["prompt_id", "prompt", "chosen", "rejected"]
    assert back.column("extra").to_pylist() == [1, 2, 3]
    assert num_rows(path) == 3
    assert len(file_sha256(path)) == 64


def test_large_string_and_int64_are_read_as_contract_types(tmp_path):
    t = pa.table({"prompt_id": pa.array(["a"], pa.large_string()), "prompt": ["p"]})
    pq.write_table(t, tmp_path / "x.parquet")
    assert read_table(tmp_path / "x.parquet", "prompts").schema.field("prompt_id").type == pa.string()


def _write_raw(tmp_path, table, name="bad.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pairs().drop(["rejected"]), r"missing column 'rejected'"),
        (pairs(prompt=[1, 2, 3]), r"column 'prompt' has type int64, expected string"),
        (pairs(prompt=["p1", None, "p3"]), r"column 'prompt' row 1: is null or empty"),
        (pairs(prompt=["p1", "p2", "   "]), r"column 'prompt' row 2: is null or empty"),
        (pairs(prompt_id=["a", "b", "a"]), r"column 'prompt_id' row 2: duplicate value 'a'"),
        (pairs(rejected=["bad", "fine", "no"]), r"column 'chosen' row 1: equals 'rejected'"),
    ],
)
def test_bad_pairs_name_file_column_and_row(tmp_path, table, match):
    path = _write_raw(tmp_path, table)
    with pytest.raises(ArtifactError, match=match) as info:
        read_table(path, "seed")
    assert str(path) in str(info.value)


def test_missing_file_says_which_stage(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist; run the stage"):
        read_table(tmp_path / "nope.parquet", "judgments")


def test_not_parquet(tmp_path):
    (tmp_path / "x.parquet").write_text("hello")
    with pytest.raises(ArtifactError, match="not a readable Parquet file"):
        read_table(tmp_path / "x.parquet", "prompts")


def responses(**over):
    cols = {
        "prompt_id": ["a", "b"],
        "prompt": ["p1", "p2"],
        "responses": [["x", "y"], ["u", "v"]],
        "finish_reasons": [["stop", "length"], ["stop", "stop"]],
        "num_tokens": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32())),
        "model": ["m", "m"],
    }
    cols.update(over)
    return pa.table(cols)


def test_responses_validation(tmp_path):
    write_table(responses(), tmp_path / "ok.parquet", "responses")
    with pytest.raises(ArtifactError, match=r"'finish_reasons' row 1: values must be one of"):
        read_table(_write_raw(tmp_path, responses(finish_reasons=[["stop", "stop"], ["stop", "eos"]])), "responses")
    with pytest.raises(ArtifactError, match=r"'num_tokens' row 0: has a different length"):
        read_table(_write_raw(tmp_path, responses(num_tokens=[[1], [3, 4]]), "b2.parquet"), "responses")


def test_judgments_p_chosen_must_be_the_winner(tmp_path):
    t = pa.table({
        "prompt_id": ["a"], "prompt": ["p"], "chosen": ["x"], "rejected": ["y"], "p_chosen": [0.4],
        "policy_logp_chosen": [-1.0], "policy_logp_rejected": [-2.0], "ref_logp_chosen": [-1.0],
        "ref_logp_rejected": [-1.0], "tie": [False], "judge": ["implicit/init"],
    })
    with pytest.raises(ArtifactError, match=r"'p_chosen' row 0: must be in \[0.5, 1\]"):
        write_table(t, tmp_path / "j.parquet", "judgments")
    assert not (tmp_path / "j.parquet").exists()


def test_streaming_finds_duplicates_across_batches(tmp_path):
    n = 1000
    ids = [f"id{i}" for i in range(n)]
    ids[900] = "id5"
    path = _write_raw(tmp_path, pa.table({"prompt_id": ids, "prompt": [f"p{i}" for i in range(n)]}))
    it = iter_batches(path, "prompts", batch_size=100)
    for _ in range(9):
        next(it)
    with pytest.raises(ArtifactError, match=r"'prompt_id' row 900: duplicate value 'id5'"):
        next(it)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_old_file_whole(tmp_path):
    target = tmp_path / "prompts.parquet"
    write_table(pa.table({"prompt_id": ["a"], "prompt": ["p"]}), target, "prompts")
    write_table(pa.table({"prompt_id": ["b", "c"], "prompt": ["q", "r"]}), target, "prompts")
    assert read_table(target, "prompts").column("prompt_id").to_pylist() == ["b", "c"]
    assert os.listdir(tmp_path) == ["prompts.parquet"]


def test_invalid_table_is_not_written(tmp_path):
    with pytest.raises(ArtifactError):
        write_table(pairs(chosen=["bad", "meh", "no"]), tmp_path / "s.parquet", "seed")
    assert os.listdir(tmp_path) == []


def test_a_stage_removes_the_temporaries_a_killed_attempt_left(tmp_path, tiny_model_dir, prefs_file):
    """A SIGKILL mid-write leaves ``.<output>.<random>.tmp`` (and a model save's ``.<dir>.tmp``); the rerun of
    the stage removes its own, and only its own."""
    from conftest import tiny_config

    from spa.run.artifacts import write_text_atomic
    from spa.run.stage_runner import run_stage

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file)
    out_file, out_dir = tmp_path / "run" / "iter_1" / "judgments.parquet", tmp_path / "run" / "iter_1" / "model"
    out_dir.parent.mkdir(parents=True)
    orphans = [out_file.parent / ".judgments.parquet.k3j4h5.tmp", out_file.parent / ".judgments.parquet.zz9.tmp"]
    for orphan in orphans:
        orphan.write_text("half a file")
    (out_dir.parent / ".model.tmp").mkdir()
    (out_dir.parent / ".model.tmp" / "model.safetensors").write_text("half a model")
    other = out_file.parent / ".responses.parquet.abc.tmp"  # another stage's: not ours to remove
    other.write_text("x")

    def body():
        write_text_atomic(out_file, "done")
        out_dir.mkdir()
        return {}

    run_stage(cfg, "judge/1", [], ["judge"], [out_file, out_dir], body, echo=lambda _m: None)
    assert not any(o.exists() for o in orphans) and not (out_dir.parent / ".model.tmp").exists()
    assert other.exists() and out_file.read_text() == "done"


def test_directory_hashes_are_cached_outside_the_folder(tmp_path, monkeypatch):
    """A user's model or data folder is hashed without writing into it (it may be shared or read-only); the cache
    lives in $SPA_CACHE_DIR and is used: a file changed in place with its size and mtime kept is not re-read."""
    from spa.run.manifest import dir_sha256

    monkeypatch.setenv("SPA_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "user_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"a" * 64)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text("{}")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    first = dir_sha256(folder)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # nothing written into the folder
    assert len(list((tmp_path / "cache").iterdir())) == 1

    stat = (folder / "weights.bin").stat()
    (folder / "weights.bin").write_bytes(b"b" * 64)  # same size; the mtime put back: the cache answers
    os.utime(folder / "weights.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dir_sha256(folder) == first
    (folder / "weights.bin").write_bytes(b"c" * 65)  # a real change is seen
    assert dir_sha256(folder) != first
