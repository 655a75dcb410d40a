"""Every model a run writes carries a Hub-format model card whose numbers are its eval.json."""

from __future__ import annotations

import json

import yaml
from conftest import tiny_config

from spa.run.layout import RunLayout
from spa.run.manifest import dir_sha256


def card_parts(text: str):
    """(YAML header, body) of a model card."""
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def eval_row(body: str) -> dict[str, str]:
    lines = body.split("## Evaluation", 1)[1].strip().splitlines()
    keys = [c.strip() for c in lines[0].strip("|").split("|")]
    values = [c.strip() for c in lines[2].strip("|").split("|")]
    return dict(zip(keys, values, strict=True))


def test_every_model_of_a_run_has_a_card_with_its_lineage_and_numbers(tmp_path, tiny_model_dir, prefs_file):
    from spa.demo.arms import quiet, run_iterations, run_seed_stage
    from spa.stages import train

    raw = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file).model_dump(mode="json")
    cfg = run_iterations(run_seed_stage(raw, echo=quiet), echo=quiet)
    lay = RunLayout.of(cfg)
    for t in (0, 1):
        header, body = card_parts((lay.model(t) / "README.md").read_text())
        assert header["library_name"] == "transformers" and f"spa-iteration-{t}" in header["tags"]
        assert header["base_model"] == tiny_model_dir.name
        evaluation = json.loads(lay.eval_summary(t).read_text())
        row = eval_row(body)
        for key in ("gold_agreement", "avg_length", "n", "win_rate"):
            assert row[key] == str(evaluation[key]), key
        assert ("trained from | pi_init" in body) == (t == 0) and (f"trained from | pi_{t - 1}" in body) == (t > 0)
        data = lay.seed if t == 0 else lay.judgments(t)
        assert data.name in body
        assert "## The round's config (resolved)" in body and "learning_rate" in body
    # the card is not part of the model's content hash: writing it never makes a finished stage rerun
    before = dir_sha256(lay.model(1))
    (lay.model(1) / "README.md").write_text("edited by hand")
    assert dir_sha256(lay.model(1)) == before
    assert train.run(cfg, 1, echo=quiet).skipped


def test_card_names_a_hub_base_model_and_dataset(tmp_path, tiny_model_dir, prefs_file):
    from spa.config import parse_config
    from spa.run.model_card import card_text

    raw = tiny_config(tmp_path / "run", tiny_model_dir, prefs_file).model_dump(mode="json")
    raw["model"]["hub_refs"] = {"model.pi_init": {"repo_id": "org/tiny", "revision": "main", "commit": "a" * 40}}
    raw["data"]["source"] = "HuggingFaceH4/ultrafeedback_binarized"
    header, body = card_parts(card_text(parse_config(raw), 2, None))
    assert header["base_model"] == "org/tiny" and header["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"]
    assert f"org/tiny@{'a' * 40}" in body and "Not evaluated yet" in body
