"""Every kind and shape of ``data.source`` prepares the same splits, byte for byte, as the same pairs in JSONL.

The hub-id source is read offline from a hub-layout cache the test builds (``datasets--org--prefs`` with
snapshots, refs and a README whose YAML names the splits), the way ``hf download --repo-type dataset`` or a
non-streaming ``datasets.load_dataset`` leaves it; streaming from the hub itself is not tested (the tests stay
offline).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from spa.data import sources
from spa.errors import StageInputError
from spa.run.layout import RunLayout
from spa.stages import prepare
from spa_tasks.plan import stage_status

MAIN, OLD = "a" * 40, "b" * 40
README = """---
configs:
- config_name: default
  data_files:
  - split: train_prefs
    path: "data/train_prefs-*"
  - split: test_prefs
    path: "data/test_prefs-*"
---
# prefs
"""


@pytest.fixture(autouse=True)
def quiet_datasets(tmp_path, monkeypatch):
    """``datasets`` writes nothing outside the test's folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    datasets.disable_progress_bars()


def rows_of(prefs_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in prefs_file.read_text().splitlines()]
    return rows + [rows[3] | {"prompt": rows[3]["prompt"].upper()}, {"prompt": "", "chosen": "a", "rejected": "b"}]


def conversation(row: dict, answer: str) -> list[dict]:
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[answer]}]


def prepared(root: Path, tiny_model_dir, source, **data) -> tuple[dict, dict[str, bytes]]:
    cfg = tiny_config(root, tiny_model_dir, source, iterations=2, data={"prompt_sizes": [10, 7], **data})
    res = prepare.run(cfg, echo=lambda _: None)
    lay = RunLayout(cfg.run_dir)
    return res.summary, {p.name: p.read_bytes() for p in (lay.seed, lay.heldout, lay.prompts(1), lay.prompts(2))}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model_dir, prefs_file):
    root = tmp_path_factory.mktemp("baseline")
    src = root / "flat.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows_of(prefs_file)))
    return prepared(root / "run", tiny_model_dir, src)[1]


def write_source(kind: str, rows: list[dict], where: Path) -> tuple[Path, dict]:
    """``rows`` as a source of ``kind``; returns the path and the data settings it needs."""
    import datasets

    if kind in ("csv", "tsv"):
        path = where / f"prefs.{kind}"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected"], delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
        return path, {}
    if kind == "conversations":  # prompt-less: the prompt is the conversation's user turn
        path = where / "conversations.jsonl"
        path.write_text("".join(json.dumps({"chosen": conversation(r, "chosen"), "rejected": conversation(r, "rejected")})
                                + "\n" for r in rows if r["prompt"]))
        return path, {}
    if kind == "saved":
        datasets.Dataset.from_list(rows).save_to_disk(where / "saved")
        return where / "saved", {}
    if kind == "saved_dict":
        full = datasets.Dataset.from_list(rows)
        datasets.DatasetDict({"train": full.select(range(5)), "prefs": full}).save_to_disk(where / "saved_dict")
        return where / "saved_dict", {"split": "prefs"}
    folder = where / "folder"  # two Parquet shards: the rows in file order
    folder.mkdir()
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        datasets.Dataset.from_list(part).to_parquet(folder / f"train-0000{n}-of-00002.parquet")
    return folder, {}


@pytest.mark.parametrize("kind", ["csv", "tsv", "conversations", "saved", "saved_dict", "folder"])
def test_every_kind_prepares_the_jsonl_splits(tmp_path, tiny_model_dir, prefs_file, baseline, monkeypatch, kind):
    monkeypatch.setattr(sources, "BATCH_ROWS", 7)  # batch boundaries must not matter either
    rows = rows_of(prefs_file)
    if kind == "conversations":
        rows = rows[:-1]  # a conversation cannot have an empty prompt: the last row, in no split, is left out
    path, data = write_source(kind, rows, tmp_path)
    summary, files = prepared(tmp_path / "run", tiny_model_dir, path, **data)
    assert files == baseline
    assert summary["source"]["kind"] == {"conversations": "jsonl", "saved_dict": "saved"}.get(kind, kind)
    assert summary["source"].get("split") == data.get("split", "train" if kind in ("folder", "saved_dict") else None)


def test_a_local_folder_is_keyed_by_its_files(tmp_path, tiny_model_dir, prefs_file):
    path, _ = write_source("folder", rows_of(prefs_file), tmp_path)
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, path, iterations=2, data={"prompt_sizes": [10, 7]})
    assert not prepare.run(cfg, echo=lambda _: None).skipped
    assert prepare.run(cfg, echo=lambda _: None).skipped and stage_status(cfg, ["prepare"])["prepare"] == "done"
    (path / "train-00001-of-00002.parquet").unlink()
    assert stage_status(cfg, ["prepare"])["prepare"] == "reruns (the source changed)"


def build_hub_cache(hub: Path, rows: list[dict]) -> Path:
    """``hub/datasets--org--prefs``: ``main`` -> MAIN (every row, UltraFeedback's layout), tag ``v1`` -> OLD
    (the first 50 rows)."""
    import datasets

    repo = hub / "datasets--org--prefs"
    uf = [{"prompt": r["prompt"], "chosen": conversation(r, "chosen"), "rejected": conversation(r, "rejected"),
           "score_chosen": 8.0, "score_rejected": 3.0} for r in rows]
    for commit, part in ((MAIN, uf), (OLD, uf[:50])):
        snap = repo / "snapshots" / commit
        (snap / "data").mkdir(parents=True)
        (snap / "README.md").write_text(README)
        datasets.Dataset.from_list(part).to_parquet(snap / "data" / "train_prefs-00000-of-00001.parquet")
        datasets.Dataset.from_list(part[:5]).to_parquet(snap / "data" / "test_prefs-00000-of-00001.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD)
    return repo


@pytest.fixture
def offline_hub(tmp_path, prefs_file, monkeypatch):
    from huggingface_hub import constants

    repo = build_hub_cache(tmp_path / "hf" / "hub", rows_of(prefs_file)[:-1])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_hub_id_reads_offline_from_the_cache_pinned_to_a_commit(tmp_path, tiny_model_dir, baseline, offline_hub):
    summary, files = prepared(tmp_path / "run", tiny_model_dir, "org/prefs", split="train_prefs")
    assert files == baseline
    assert summary["source"] == {"kind": "hub", "repo_id": "org/prefs", "split": "train_prefs", "revision": "main",
                                 "commit": MAIN, "read_from": "local cache"}
    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "org/prefs", iterations=2,
                      data={"prompt_sizes": [10, 7], "split": "train_prefs"})
    assert stage_status(cfg, ["prepare"])["prepare"] == "done" and prepare.run(cfg, echo=lambda _: None).skipped
    (offline_hub / "refs" / "main").write_text(OLD)  # the branch moved: the source changed
    assert stage_status(cfg, ["prepare"])["prepare"] == "reruns (the source changed)"
    summary, _ = prepared(tmp_path / "v1", tiny_model_dir, "org/prefs", split="train_prefs", revision="v1")
    assert (summary["source"]["revision"], summary["source"]["commit"], summary["rows_in"]) == ("v1", OLD, 50)


def test_a_missing_split_is_one_clear_error(tmp_path, tiny_model_dir, offline_hub):
    with pytest.raises(StageInputError, match=r"org/prefs \(split nope\): no split 'nope' \(its splits: 'train_prefs', "
                                              r"'test_prefs'\); set data.split"):
        prepared(tmp_path / "run", tiny_model_dir, "org/prefs", split="nope")


def test_an_unknown_hub_dataset_offline_is_one_line_and_exit_2(tmp_path, tiny_model_dir):
    """Through the real command, with ``HF_HUB_OFFLINE=1`` in the environment (read when the hub client loads)."""
    import yaml

    cfg = tiny_config(tmp_path / "run", tiny_model_dir, "org/unknown", data={"split": "train_prefs"})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(Path(sys.executable).parent / "spa"), "prepare", str(path)], capture_output=True,
                         text=True, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: org/unknown@main: not a local path, and as a hub dataset id "
                                                   "not in the local cache"), res.stderr
    assert "offline (HF_HUB_OFFLINE)" in lines[0] and "Traceback" not in res.stderr


def test_a_revision_for_a_local_file_is_refused(tmp_path, prefs_file):
    with pytest.raises(StageInputError, match="applies to a hub dataset id only"):
        sources.resolve_source(str(prefs_file), revision="main")


def test_the_preflight_check_leaves_a_hub_dataset_id_to_prepare(tmp_path, tiny_model_dir):
    """`spa run` checks files before any server starts: a hub id is no file, and the source reader (above) is
    what decides whether the hub or its cache has it; a missing local data file is still named."""
    from spa.config import parse_config
    from spa.run.preflight import problems

    def found(source):
        cfg = parse_config({"run_dir": str(tmp_path / "r"), "model": {"pi_init": str(tiny_model_dir)},
                            "data": {"source": source}, "evaluate": {"eval_set": "heldout"}})
        return problems(cfg)

    assert found("HuggingFaceH4/ultrafeedback_binarized") == []
    assert found("nowhere/missing.jsonl") == ["data.source: nowhere/missing.jsonl does not exist"]
    assert found("missing/pairs.parquet") == ["data.source: missing/pairs.parquet does not exist"]
