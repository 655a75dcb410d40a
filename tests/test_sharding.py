"""Chunk-aligned shards merge into exactly the unsharded artifact."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config

from spa.run.artifacts import file_sha256, iter_chunks, read_table
from spa.run.layout import RunLayout
from spa.run.sharding import parse_shard, shard_bounds, shard_path
from spa.stages import judge, prepare, sample


def test_shard_bounds_cover_rows_in_whole_chunks():
    bounds = [shard_bounds(23, (i, 3), 4) for i in range(3)]
    assert bounds == [(0, 8), (8, 16), (16, 23)]
    assert shard_bounds(23, None, 4) == (0, 23)
    assert [shard_bounds(3, (i, 4), 4) for i in range(4)] == [(0, 0), (0, 0), (0, 0), (0, 3)]
    with pytest.raises(ValueError):
        parse_shard("3/3")
    with pytest.raises(ValueError):
        parse_shard("x")


def test_iter_chunks_ignore_row_groups(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt_id": [f"{i}" for i in range(10)], "prompt": ["p"] * 10}), path, row_group_size=3)
    got = [(first, t.column("prompt_id").to_pylist()) for first, t in iter_chunks(path, "prompts", 4, start=1, stop=10)]
    assert got == [(1, ["1", "2", "3", "4"]), (5, ["5", "6", "7", "8"]), (9, ["9"])]


def test_sharded_sample_and_judge_equal_unsharded(tmp_path, tiny_model_dir, prefs_file):
    results = {}
    for name, shards in (("whole", None), ("sharded", 3)):
        cfg = tiny_config(tmp_path / name, tiny_model_dir, prefs_file,
                          sample={"chunk_rows": 4}, judge={"chunk_rows": 4})
        prepare.run(cfg)
        lay = RunLayout(cfg.run_dir)
        shutil.copytree(tiny_model_dir, lay.model(0))
        if shards:
            for stage in (sample, judge):
                for i in range(shards):
                    stage.run(cfg, 1, shard=f"{i}/{shards}")
                stage.run(cfg, 1, merge=shards)
            assert shard_path(lay.judgments(1), (0, shards)).exists()
        else:
            sample.run(cfg, 1)
            judge.run(cfg, 1)
        results[name] = lay
    a, b = results["whole"], results["sharded"]
    ra, rb = read_table(a.responses(1), "responses"), read_table(b.responses(1), "responses")
    assert ra.drop(["model"]).equals(rb.drop(["model"]))  # "model" names each run's own pi_0 path
    ja, jb = read_table(a.judgments(1), "judgments"), read_table(b.judgments(1), "judgments")
    assert ja.num_rows == 16
    assert ja.equals(jb)
    # merged row group by row group: the very same bytes as the unsharded files
    assert file_sha256(a.judgments(1)) == file_sha256(b.judgments(1))
    assert file_sha256(a.responses(1)) == file_sha256(b.responses(1))
