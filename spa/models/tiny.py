"""Tiny Llama-architecture causal LMs built offline in seconds (tests, the demo world).

The tokenizer is a byte-level BPE trained locally with ``tokenizers`` on a given
corpus; the chat template is ChatML with one BOS. Nothing touches a model hub.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "<|im_end|>", "<pad>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, EOS]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

DEFAULT_CORPUS = [
    "Write a short list of three fruits.",
    "apple banana cherry grape lemon mango orange pear plum",
    "The quick brown fox jumps over the lazy dog.",
    "Please answer in one sentence. Use the word blue.",
    "Sure! Here is a list: - red - green - blue.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 and words like yes no maybe",
    "user assistant system hello thanks goodbye question answer",
]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with a ChatML chat template; deterministic for a corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=[IM_START]
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, layers: int = 2, heads: int = 2, max_positions: int = 1024,
                      **extra) -> LlamaConfig:
    """A small Llama config; head_dim = hidden/heads = 64 by default (the vLLM CPU backend needs 64)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        **extra,
    )


def build_tiny_model(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> Path:
    """Build and save a random-initialised tiny Llama + tokenizer (safetensors) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus or DEFAULT_CORPUS, vocab_size=vocab_size)
    config = tiny_llama_config(
        len(tok), hidden_size, layers, heads,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
