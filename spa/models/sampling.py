"""Sampling backends: vLLM (GPU, or its CPU build) and transformers (any device).

Every sampling parameter is passed explicitly and recorded; the model's
``generation_config.json`` never changes them (vllm#11953, vllm#15281). Prompts
are rendered by :mod:`spa.models.rendering` and given to either backend as token ids,
so both sample from exactly the same context.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from spa.config import ModelConfig, SampleConfig
from spa.errors import BackendUnavailable, SequenceTooLongError
from spa.models.rendering import load_tokenizer, prompt_ids, stop_token_ids
from spa.run.console import progress_bar


@dataclass(frozen=True)
class SamplingSpec:
    """What a sampler needs, taken from the config (``sample:`` and ``model:``; no defaults of its own)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    batch_size: int
    max_length: int
    gpu_memory_utilization: float
    max_num_batched_tokens: int | None
    dtype: str
    trust_remote_code: bool
    tensor_parallel_size: int = 1  # vLLM only (docs/scale_out.md)
    pipeline_parallel_size: int = 1

    @classmethod
    def from_config(cls, sample: SampleConfig, model: ModelConfig, **overrides) -> SamplingSpec:
        """``sample``'s settings with ``model``'s length, dtype and trust flag; ``overrides`` replace fields."""
        fields = {name: getattr(sample, name) for name in ("n", "temperature", "top_p", "max_new_tokens", "seed",
                                                           "batch_size", "gpu_memory_utilization",
                                                           "max_num_batched_tokens", "tensor_parallel_size",
                                                           "pipeline_parallel_size")}
        fields |= {"max_length": model.max_length, "dtype": model.dtype, "trust_remote_code": model.trust_remote_code}
        return cls(**(fields | overrides))


@dataclass
class Samples:
    """``n`` responses for one prompt."""

    responses: list[str]
    finish_reasons: list[str]
    num_tokens: list[int]
    # the sampled ids (the stop token included when the response finished) and the sum of their raw
    # (pre-temperature, pre-top-p) log-probabilities under the sampling model: the judge's
    # ``policy_logps: from_sampling`` reuses them as log pi_{t-1}(y|x) (issue P3)
    token_ids: list[list[int]] = dataclasses.field(default_factory=list)
    logps: list[float] = dataclasses.field(default_factory=list)


def prompt_seed(seed: int, prompt) -> int:
    """A per-prompt sampling seed derived from the run's seed and the prompt text (or conversation)."""
    text = prompt if isinstance(prompt, str) else json.dumps([dict(m) for m in prompt], sort_keys=True)
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:4], "little")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (e.g. torchvision ops) raises more than ImportError
        return False
    return True


def choose_backend(name: str) -> str:
    """``auto`` picks vLLM when it imports and a GPU is present, else transformers."""
    if name == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_available() else "transformers"
    if name == "vllm" and not vllm_available():
        raise BackendUnavailable(
            "sample.backend is 'vllm' but vLLM cannot be imported in this environment; install it "
            "(`pip install 'spa-pipeline[vllm]'`, or point sample.python at a vLLM environment) "
            "or set sample.backend: transformers"
        )
    return name


def _check_prompt_lengths(encoded: Sequence[list[int]], spec: SamplingSpec) -> None:
    room = spec.max_length - spec.max_new_tokens
    for i, ids in enumerate(encoded):
        if len(ids) > room:
            raise SequenceTooLongError(
                f"row {i}: prompt has {len(ids)} tokens; with max_new_tokens={spec.max_new_tokens} it exceeds "
                f"model.max_length={spec.max_length}. Shorten or drop the prompt, or raise model.max_length"
            )


def _split_generation(tokens: list[int], stops: set[int]) -> tuple[list[int], str]:
    for i, tid in enumerate(tokens):
        if tid in stops:
            return tokens[:i], "stop"
    return tokens, "length"


class RawLogpRecorder:
    """A logits processor that records the raw log-probability of every sampled token.

    ``generate`` calls custom processors before its temperature/top-p warpers, so the scores seen here
    are the model's own (float32) logits. The token sampled at step ``s`` only shows at step ``s + 1``
    (as the last input id), so the previous step's log-softmax is kept and gathered then;
    :meth:`finish` gathers the last step's. Memory: one ``[rows, vocab]`` tensor, not one per step.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_ids: torch.Tensor) -> list[list[float]]:
        """Per-row log-probs of the generated tokens; ``last_ids`` is the final column of the output."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, last_ids.unsqueeze(-1).to(self.prev.device)).squeeze(-1))
        table = torch.stack(self.steps, dim=1).double().cpu().tolist() if self.steps else []
        self.prev, self.steps = None, []
        return table


class TransformersSampler:
    """``spec.n`` samples per prompt with ``model.generate`` (left-padded, length-sorted batches).

    Each call seeds torch from the run's seed and its first prompt, so a chunk of prompts gets the
    same samples whether the file is processed whole or in chunk-aligned shards.
    """

    def __init__(self, model_dir: str | Path, spec: SamplingSpec):
        from transformers import GenerationConfig

        from spa.models.loading import load_causal_lm

        self.spec = spec
        self.tok = load_tokenizer(model_dir, spec.trust_remote_code)
        self.model = load_causal_lm(model_dir, spec.dtype, trust_remote_code=spec.trust_remote_code)
        self.stops = set(stop_token_ids(self.tok))
        self.logp_dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        greedy = spec.temperature == 0  # greedy decoding (the instruction-following evaluation)
        sampling = {} if greedy else {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
        self.gen = GenerationConfig(
            do_sample=not greedy, **sampling,
            max_new_tokens=spec.max_new_tokens, num_return_sequences=spec.n, eos_token_id=sorted(self.stops),
            pad_token_id=self.tok.pad_token_id, repetition_penalty=1.0, bos_token_id=self.tok.bos_token_id,
        )
        # generate() fills what a passed config leaves unset from the model's own generation_config.json
        # (min_p, no_repeat_ngram_size, min_new_tokens...), and those processors would run before the raw
        # log-prob recorder: replace the model's defaults with ours, as vLLM's backend does (generation_config="vllm")
        self.model.generation_config = copy.deepcopy(self.gen)

    @torch.no_grad()
    def __call__(self, prompts: Sequence, progress: str | None = None, max_new_tokens: int | None = None) -> list[Samples]:
        """Samples for ``prompts`` (texts or conversations); ``max_new_tokens`` overrides the spec's."""
        spec, tok, gen = self.spec, self.tok, self.gen
        if max_new_tokens is not None and max_new_tokens != spec.max_new_tokens:
            spec = dataclasses.replace(spec, max_new_tokens=max_new_tokens)
            gen = copy.deepcopy(gen)
            gen.max_new_tokens = max_new_tokens
        encoded = [prompt_ids(tok, p) for p in prompts]
        _check_prompt_lengths(encoded, spec)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        batches = [order[i : i + spec.batch_size] for i in range(0, len(order), spec.batch_size)]
        results: list[Samples | None] = [None] * len(encoded)
        device = next(self.model.parameters()).device
        if prompts:
            torch.manual_seed(prompt_seed(spec.seed, prompts[0]))
        for idx in progress_bar(len(batches), progress or "", "batch", progress is not None, iterable=batches):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                attn[row, width - len(encoded[i]) :] = 1
            recorder = RawLogpRecorder()
            out = self.model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=gen,
                                      logits_processor=[recorder])
            new = out[:, width:].cpu().tolist()
            logps = recorder.finish(out[:, -1])
            for row, i in enumerate(idx):
                rows = [row * spec.n + k for k in range(spec.n)]
                results[i] = _samples(tok, [new[r] for r in rows], self.stops, token_logps=[logps[r] for r in rows])
        return results  # type: ignore[return-value]


class VLLMSampler:
    """``spec.n`` samples per prompt with the vLLM engine (lazy import; GPU or the vLLM CPU build)."""

    def __init__(self, model_dir: str | Path, spec: SamplingSpec):
        choose_backend("vllm")
        from vllm import LLM

        self.spec = spec
        self.tok = load_tokenizer(model_dir, spec.trust_remote_code)
        self.stops = stop_token_ids(self.tok)
        self.llm = LLM(**engine_kwargs(model_dir, spec))
        self.logp_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def __call__(self, prompts: Sequence, progress: str | None = None, max_new_tokens: int | None = None) -> list[Samples]:
        """Samples for ``prompts`` (texts or conversations); ``max_new_tokens`` overrides the spec's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        spec = self.spec if max_new_tokens is None else dataclasses.replace(self.spec, max_new_tokens=max_new_tokens)
        encoded = [prompt_ids(self.tok, p) for p in prompts]
        _check_prompt_lengths(encoded, spec)
        # one seed per prompt, from the run's seed and the prompt text: a shared seed would give every
        # prompt the same random stream, and a positional one would change with sharding
        params = [
            SamplingParams(
                n=spec.n, temperature=spec.temperature, top_p=spec.top_p, top_k=0, max_tokens=spec.max_new_tokens,
                seed=prompt_seed(spec.seed, p), stop_token_ids=self.stops, skip_special_tokens=True,
                repetition_penalty=1.0, logprobs=0,  # 0: the sampled token's log-prob only
            )
            for p in prompts
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                    use_tqdm=progress is not None and sys.stderr.isatty())
        stop_set = set(self.stops)
        results = []
        for out in outputs:
            comps = sorted(out.outputs, key=lambda c: c.index)
            token_logps = [[pos[tid].logprob for pos, tid in zip(c.logprobs or [], c.token_ids, strict=False)]
                           for c in comps]
            results.append(_samples(self.tok, [list(c.token_ids) for c in comps], stop_set,
                                    ["stop" if c.finish_reason == "stop" else None for c in comps], token_logps))
        return results


def engine_kwargs(model_dir: str | Path, spec: SamplingSpec) -> dict:
    """The keyword arguments of vLLM's ``LLM(...)`` for ``spec`` (unit-tested without starting an engine)."""
    return dict(
        model=str(model_dir), tokenizer=str(model_dir), dtype=spec.dtype, seed=spec.seed,
        gpu_memory_utilization=spec.gpu_memory_utilization, max_model_len=spec.max_length,
        trust_remote_code=spec.trust_remote_code,
        # one engine over tensor_parallel_size x pipeline_parallel_size GPUs (the first visible ones; a shard of
        # `spa run --shards N` sees only its own group: spa.run.sharding.shard_devices)
        tensor_parallel_size=spec.tensor_parallel_size, pipeline_parallel_size=spec.pipeline_parallel_size,
        generation_config="vllm",  # ignore the model's generation_config.json: our parameters only
        logprobs_mode="raw_logprobs",  # the model's own log-probs, before temperature/top-p (P3 reuse)
        **_engine_budget(spec),
    )


def _engine_budget(spec: SamplingSpec) -> dict:
    """vLLM scheduler settings. On CPU, chunked prefill is switched off: when a step's token budget splits a
    prompt's prefill, vLLM rewinds that request's seeded generator (``gen.set_offset``), which CPU generators do
    not support ('CPU Generator does not use offset'); it crashed sampling as soon as one step's prompts exceeded
    the budget (~100+ prompts). Whole prompts per step need a budget of at least ``max_length``."""
    kwargs: dict = {}
    if spec.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = spec.max_num_batched_tokens
    if not torch.cuda.is_available():
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(spec.max_length, spec.max_num_batched_tokens or 4096)
        # no graph compilation on CPU: it cost 72 s at every engine start (vLLM's compile cache never loaded) for
        # 5% more tokens/s (SmolLM2-135M, 2 cores: 43 s start and 122 tokens/s eager, 115 s and 128 compiled)
        kwargs["enforce_eager"] = True
    return kwargs


def _samples(tok, generations: list[list[int]], stops: set[int], reasons_given: list | None = None,
             token_logps: list[list[float]] | None = None) -> Samples:
    """Split each generation at its first stop token; ``token_logps[k][i]`` is the raw log-prob of token ``i``."""
    texts, reasons, counts, ids, sums = [], [], [], [], []
    for k, tokens in enumerate(generations):
        kept, reason = _split_generation(tokens, stops)
        reason = (reasons_given[k] if reasons_given else None) or reason
        texts.append(tok.decode(kept, skip_special_tokens=True))
        reasons.append(reason)
        counts.append(len(kept))
        # the stop token belongs to the response's probability (the rendering path scores it too)
        sampled = tokens[: len(kept) + 1] if reason == "stop" and len(tokens) > len(kept) else kept
        ids.append(list(sampled))
        if token_logps is not None and len(token_logps[k]) >= len(sampled):
            sums.append(float(sum(token_logps[k][: len(sampled)])))
        else:
            sums.append(float("nan"))
    return Samples(texts, reasons, counts, ids, sums)


def make_sampler(backend: str, model_dir: str | Path, spec: SamplingSpec):
    """The sampler of the chosen backend (``auto`` resolved by :func:`choose_backend`)."""
    if choose_backend(backend) == "vllm":
        return VLLMSampler(model_dir, spec)
    if spec.tensor_parallel_size * spec.pipeline_parallel_size > 1:  # backend auto, resolved to transformers
        raise BackendUnavailable(
            f"sample.tensor_parallel_size {spec.tensor_parallel_size} x pipeline_parallel_size "
            f"{spec.pipeline_parallel_size} needs the vllm backend, which cannot run here (no GPU or no vLLM): "
            "set both to 1 or run where vLLM and the GPUs are")
    return TransformersSampler(model_dir, spec)
