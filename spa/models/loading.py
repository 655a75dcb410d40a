"""Loading models safely: safetensors only, no remote code unless configured."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from spa.errors import ModelLoadError  # noqa: F401 - raised here, defined without torch for the CLI

ADAPTER_CONFIG = "adapter_config.json"


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``auto`` is bf16 on a GPU that supports it, fp32 elsewhere."""
    if name == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16}[name]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(
    path: str | Path,
    dtype: str = "auto",
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load a causal LM (or a base + peft adapter) from a local directory, in eval mode.

    Weights come from safetensors only (``use_safetensors=True``): a directory with only
    pickled ``.bin`` weights is refused rather than unpickled.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, device)
    try:
        if is_adapter_dir(path):
            from peft import PeftModel

            base_path = json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
            base = AutoModelForCausalLM.from_pretrained(
                base_path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
            model = PeftModel.from_pretrained(base, path)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot load the model safely ({exc})") from exc
    return model.to(device).eval()


def save_model_dir(model: PreTrainedModel, tok, target: Path, state_dict: dict | None = None) -> Path:
    """Save weights (safetensors) and tokenizer as ``target``, atomically: a crash leaves the old directory
    or none, never a half-written one (written beside it, then renamed into place). ``state_dict``: the weights
    to write instead of the model's own (a sharded model's gathered full weights)."""
    import os
    import shutil

    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
