"""``pi_init`` of the demo world: a tiny Llama trained from scratch on mixed-quality demonstrations.

A word-level tokenizer over the world's vocabulary and ChatML turns keep sequences
short (about 30 tokens), so supervised fine-tuning takes well under a minute on 2 CPU
cores. Training uses transformers' ``Trainer`` on the rendered conversations, with the
loss on the response tokens (and end-of-turn token) only.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from spa.demo.world import DEMO_RATES, DemoWriter, make_prompts, vocabulary
from spa.models.logprobs import collate, encode_pair
from spa.models.tiny import BOS, CHAT_TEMPLATE, EOS, IM_START, PAD, tiny_llama_config

UNK = "<unk>"


def world_tokenizer(extra_words: int = 0) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary, ChatML template, one BOS.

    ``extra_words`` adds made-up words ``w0, w1, ...`` (benchmarks that want a realistic vocabulary size)."""
    specials = [PAD, BOS, IM_START, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + vocabulary() + [f"w{i}" for i in range(extra_words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, additional_special_tokens=[IM_START])
    fast.chat_template = CHAT_TEMPLATE
    return fast


class _SFTData(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return self.encoded[i]


def _sft_collate(pad_id: int):
    def fn(items):
        batch = collate(items, pad_id)
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, 1:] = torch.where(batch["loss_mask"], batch["labels"], torch.full_like(batch["labels"], -100))
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    return fn


def train_pi_init(out_dir: str | Path, num_demos: int = 3000, epochs: int = 4,
                  seed: int = 0, learning_rate: float = 3e-3, init_seed: int | None = None,
                  rates: dict[str, float] | None = None, *, warmup: float) -> Path:
    """Write ``pi_init`` (safetensors + tokenizer) trained on ``num_demos`` mixed-quality demonstrations.

    ``init_seed`` (default ``seed``) seeds only the initial weights and the data order, not the demonstrations:
    ``build_world`` retrains from another one when this run stayed on the plateau where topic membership is
    not learnt (``spa.demo.run._trained_pi_init``). ``rates``: per-feature rates that replace
    :data:`spa.demo.world.DEMO_RATES` (a world variant, for trials). ``warmup``: the share of steps the learning
    rate warms up over (the world's is ``spa.demo.run.WorldSizes.sft_warmup``; trials of the plateau:
    ``bench/pi_init_first_attempt.py``)."""
    unknown = set(rates or {}) - set(DEMO_RATES)
    if unknown:
        raise ValueError(f"unknown demonstration rates {sorted(unknown)}; known: {sorted(DEMO_RATES)}")
    out = Path(out_dir)
    tok = world_tokenizer()
    writer = DemoWriter(rates=DEMO_RATES | (rates or {}), rng=random.Random(seed + 1))
    prompts = make_prompts(num_demos, seed=seed + 1000)
    encoded = [encode_pair(tok, p, writer(p), True) for p in prompts]
    config = tiny_llama_config(len(tok), hidden_size=128, layers=2, heads=2, max_positions=256,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
    init = seed if init_seed is None else init_seed
    torch.manual_seed(init)
    model = LlamaForCausalLM(config)
    args = TrainingArguments(
        output_dir=str(out.parent / f".{out.name}.sft"), per_device_train_batch_size=32, num_train_epochs=epochs,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0,
        logging_steps=50, save_strategy="no", report_to=[], seed=init, use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
    )
    Trainer(model=model, args=args, train_dataset=_SFTData(encoded), data_collator=_sft_collate(tok.pad_token_id)).train()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
