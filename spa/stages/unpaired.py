"""SSPO's unpaired set drawn from the model itself (``data.unpaired_source: pi_init``, docs/variants.md 7).

With no second data source, ``D_U`` is one sample of ``pi_init`` per prompt of the run's prompt batches
``X_1..X_T`` (``data.unpaired_size`` of them when set, drawn seeded): prompts already disjoint from the seed and
held-out pairs by ``spa prepare``, answers with no label, as SSPO asks. The ``sample:`` settings apply (backend,
temperature, new tokens, seed, ``sample.python``) with one response per prompt. The seed stage runs this first
(:func:`spa.stages.train.run` at ``t = 0``); it is its own manifest entry (``unpaired``), so a finished set is
not sampled again, and a changed ``pi_init``, prompt batch, ``data.unpaired_size``, ``data.shuffle_seed`` or
sampling setting that changes the answers draws a new one (see :func:`_key`). Empty answers are dropped and
counted; an answer cut off at ``sample.max_new_tokens`` is kept and marked (``finished`` false), so training
does not end it with the end-of-turn token. The file is ``<run>/data/unpaired.parquet``, the one prepare writes
from a source.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from spa.config import PI_INIT_UNPAIRED, SPAConfig
from spa.errors import StageInputError
from spa.run.artifacts import iter_chunks, num_rows, write_table
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, Stage, is_up_to_date
from spa.run.stage_runner import StageResult, expected_key, require, run_stage
from spa.schemas import UNPAIRED_DRAWN

SECTIONS = ["model"]  # and the sampling settings that change the draw (_key)


def chosen_rows(total: int, size: float | None, shuffle_seed: int) -> np.ndarray:
    """Which of the ``total`` prompts of ``X_1..X_T`` (in order) get a sample: all, a count, or a fraction (< 1)
    of them, drawn with the run's shuffle seed; ascending."""
    if size is not None and size >= 1 and size != int(size):
        raise StageInputError(f"data.unpaired_size={size}: give a whole count (>= 1) or a fraction (< 1)")
    want = total if size is None else int(round(size * total)) if size < 1 else int(size)
    if want == 0:
        raise StageInputError(f"data.unpaired_size={size} of the {total} prompts of X_1..X_T is no prompt at all: "
                              "raise it (or data.prompt_sizes)")
    if want > total:
        raise StageInputError(f"data.unpaired_size asks for {want} unpaired answers, but the run's prompt batches "
                              f"X_1..X_T hold {total} prompts (one pi_init sample each): lower it or raise "
                              "data.prompt_sizes")
    return np.sort(np.random.default_rng([shuffle_seed, 0xD0]).permutation(total)[:want])


def _chosen_prompts(cfg: SPAConfig) -> tuple[dict[str, list], int]:
    """The chosen prompts of ``X_1..X_T`` (``prompt_id``, ``prompt``, ``source_row``: the row of the batches read in
    order) and how many prompts the batches hold."""
    layout = RunLayout.of(cfg)
    paths = [layout.prompts(t) for t in range(1, cfg.iterations + 1)]
    total = sum(num_rows(p) for p in paths)
    wanted = set(chosen_rows(total, cfg.data.unpaired_size, cfg.data.shuffle_seed).tolist())
    out: dict[str, list] = {"prompt_id": [], "prompt": [], "source_row": []}
    offset = 0
    for path in paths:
        for first, chunk in iter_chunks(path, "prompts", cfg.sample.chunk_rows):
            for i in range(chunk.num_rows):
                if offset + first + i in wanted:
                    out["prompt_id"].append(chunk.column("prompt_id")[i].as_py())
                    out["prompt"].append(chunk.column("prompt")[i].as_py())
                    out["source_row"].append(offset + first + i)
        offset += num_rows(path)
    return out, total


def _unpaired(cfg: SPAConfig) -> dict[str, Any]:
    """Sample pi_init once per chosen prompt in a child process (``sample.python``'s environment, else this
    interpreter's: one call, one model load; a vLLM engine's GPU memory is handed back before the seed stage trains
    in this process) and write the non-empty answers to ``<run>/data/unpaired.parquet``."""
    from spa.models.remote_sampling import RemoteSampler
    from spa.models.sampling import SamplingSpec

    rows, total = _chosen_prompts(cfg)
    spec = SamplingSpec.from_config(cfg.sample, cfg.model, n=1)
    sampler = RemoteSampler(cfg.sample.python or sys.executable, cfg.sample.backend, cfg.model.pi_init, spec)
    samples = sampler(rows["prompt"], progress="sample pi_init (unpaired set)")
    keep = [i for i, s in enumerate(samples) if s.responses[0].strip()]  # an empty answer is no SSPO example
    if not keep:
        raise StageInputError(f"pi_init ({cfg.model.pi_init}) answered every one of {len(samples)} prompts with an "
                              "empty response: no unpaired set to train on (check sample.max_new_tokens and the "
                              "model's chat template)")
    table = {k: [v[i] for i in keep] for k, v in rows.items()} | {
        "response": [samples[i].responses[0] for i in keep],
        "finished": [samples[i].finish_reasons[0] != "length" for i in keep]}
    write_table(pa.table(table, schema=UNPAIRED_DRAWN), RunLayout.of(cfg).unpaired, "unpaired")
    lengths = [samples[i].num_tokens[0] for i in keep]
    return {"source": PI_INIT_UNPAIRED, "prompts_in_batches": total, "prompts_sampled": len(samples),
            "unpaired": len(keep), "empty_dropped": len(samples) - len(keep),
            "truncated_share": round(sum(s.finish_reasons[0] == "length" for s in samples) / len(samples), 4),
            "mean_tokens": round(sum(lengths) / len(lengths), 2)}


def _key(cfg: SPAConfig) -> tuple[list[Path], dict[str, Any]]:
    """What the set is drawn from (the prompt batches and pi_init) and the settings that change the draw. The
    other sampling settings (memory, chunking, the interpreter) do not redraw it, nor retrain pi_0 after it; nor does
    vLLM's batch size (each request has its own seed), but the transformers backend draws a batch from one
    generator, so there the batch size is part of the key. ``backend`` is keyed as written: ``auto`` stays one key
    whichever backend it resolves to on this host."""
    if cfg.data.unpaired_source != PI_INIT_UNPAIRED:
        raise StageInputError(f"data.unpaired_source is {cfg.data.unpaired_source or 'not set'}: nothing to sample "
                              f"(spa prepare reads an unpaired source; this stage draws the set from pi_init with "
                              f"data.unpaired_source: {PI_INIT_UNPAIRED})")
    layout, sc = RunLayout.of(cfg), cfg.sample
    inputs = [require(layout.prompts(t), f"prompt set X_{t}", "spa prepare") for t in range(1, cfg.iterations + 1)]
    inputs.append(require(Path(cfg.model.pi_init), "pi_init", "model.pi_init"))
    draw = {"unpaired_size": cfg.data.unpaired_size, "shuffle_seed": cfg.data.shuffle_seed, "backend": sc.backend,
            "temperature": sc.temperature, "top_p": sc.top_p, "max_new_tokens": sc.max_new_tokens, "seed": sc.seed}
    if sc.backend != "vllm":
        draw["batch_size"] = sc.batch_size
    return inputs, draw


def is_drawn(cfg: SPAConfig) -> bool:
    """Whether ``<run>/data/unpaired.parquet`` is the up-to-date draw of this config."""
    inputs, draw = _key(cfg)
    expected = expected_key(cfg, inputs, SECTIONS, draw)
    return is_up_to_date(Manifest(RunLayout.of(cfg).manifest), Stage.UNPAIRED.key(), expected)


def run(cfg: SPAConfig, force: bool = False, echo=print) -> StageResult:
    """Draw the unpaired set from pi_init (``data.unpaired_source: pi_init``); up to date: nothing to do."""
    inputs, draw = _key(cfg)
    return run_stage(cfg, Stage.UNPAIRED.key(), inputs, SECTIONS, [RunLayout.of(cfg).unpaired],
                     partial(_unpaired, cfg), extra_key=draw, force=force, echo=echo)
