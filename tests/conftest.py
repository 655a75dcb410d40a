"""Shared fixtures. No test may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a local tokenizer and ChatML template, built once per session."""
    from spa.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


WORDS = "apple banana cherry grape lemon mango orange pear plum red green blue".split()


def write_preferences(path, n=60, seed=0):
    """A small plain-layout preference file (prompt/chosen/rejected strings)."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            a, b = rng.sample(WORDS, 2)
            fh.write(json.dumps({"prompt": f"Write about {a} and {b}, number {i}.",
                                 "chosen": f"{a} and {b} are nice.", "rejected": f"no {b}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def prefs_file(tmp_path_factory):
    return write_preferences(tmp_path_factory.mktemp("data") / "prefs.jsonl")


def tiny_config(run_dir, pi_init, source, **sections):
    """A config for a seconds-long run on the tiny model; ``sections`` update the defaults."""
    from spa.config import parse_config

    raw = {
        "run_dir": str(run_dir),
        "iterations": 1,
        "model": {"pi_init": str(pi_init), "max_length": 256},
        "data": {"source": str(source), "seed_size": 16, "prompt_sizes": [16], "heldout_size": 8},
        "sample": {"max_new_tokens": 12, "batch_size": 8},
        "judge": {"batch_size": 8},
        "train": {"batch_size": 4, "micro_batch_size": 2, "learning_rate": 1e-3, "seed_epochs": 1, "save_steps": 2},
        "evaluate": {"max_prompts": 4, "max_new_tokens": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return parse_config(raw)
