"""Scores of a chunk of candidates under the configured judge (the numbers ``spa judge`` labels from).

The implicit reward of Eq. 7 needs pi_{t-1}'s and the reference's sequence log-probs (or pi_{t-1}'s
log-probs recorded at sampling, ``judge.policy_logps: from_sampling``); the judge variants of
docs/variants.md 6 use an external reward model or an LLM judge instead. The models are loaded
once per file (``Judges``); labelling the scores is :mod:`spa.stages.judge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from spa.config import SPAConfig
from spa.errors import UntrustedSampledLogps
from spa.run.layout import model_dir


def response_lengths(rendered_counts, finished) -> np.ndarray:
    """|y| of Eq. 13 and of ``chosen_tokens``/``rejected_tokens``: the response's tokens without the end-of-turn
    token, for every judge (a rendered finished response carries one more token than its text)."""
    return np.asarray(rendered_counts, np.int32) - np.asarray(finished, np.int32)


def reference_dir(cfg: SPAConfig, t: int) -> Path | None:
    """The judge's reference: pi_init (paper), pi_{t-1}'s predecessor, or none."""
    if cfg.judge.reference == "none":
        return None
    if cfg.judge.reference == "previous" and t >= 2:
        return model_dir(cfg, t - 2)
    return Path(cfg.model.pi_init)


@dataclass
class Scores:
    """Per-candidate numbers of one chunk, ``[P, k]`` arrays (``k`` candidates per prompt)."""

    reward: np.ndarray  # without length penalty; NaN where the judge has no per-response reward (LLM judge)
    policy: np.ndarray  # log pi_{t-1}(y|x); NaN for external judges
    ref: np.ndarray  # log pi_ref(y|x); NaN without a reference
    lens: np.ndarray  # response tokens (the policy tokenizer's count)
    p_first: np.ndarray | None = None  # pairwise judges (LLM judge): p(y1 > y2) directly
    decisive: bool = False  # the verifier: a higher reward is a certain preference (p_chosen 1, or 0.5 on a tie)



@dataclass
class Sampled:
    """What the sampler recorded for the candidates (``[P][k]``): the exact token ids it drew (the stop token
    included when the response finished) and the sum of their raw log-probs under pi_{t-1}."""

    token_ids: list[list[list[int]]]
    logps: np.ndarray


SAMPLED_COLUMNS = ("token_ids", "sampled_logps", "logp_dtype")


def sampled_candidates(rows: pa.Table, k: int, judge_dtype: str, where: str, first_row: int = 0) -> Sampled:
    """The recorded sampling log-probs of the first ``k`` responses per row, refused (one clear error naming the
    file and row) where they cannot stand in for rescoring pi_{t-1} (issue P3): not recorded (responses from a
    sampler that did not keep them), or computed in another precision than the judge's (``logp_dtype`` vs the
    judge's model dtype: mixing precisions shifts Eq. 7's margins).

    Responses whose sampled ids are not what the rendering path gives for their text (a non-canonical
    tokenization, a special token dropped by decoding, a stop on EOS where the template closes turns with another
    token) are not refused: :meth:`Judges.score` rescores those with pi_{t-1}.
    """
    missing = [c for c in SAMPLED_COLUMNS if c not in rows.column_names]
    if missing:
        raise UntrustedSampledLogps(
            f"{where}: no sampled log-probs (columns {missing} missing): these responses were written by a sampler "
            "that did not record them; sample again, or set judge.policy_logps: rescore")
    ids_col, logp_col = rows.column("token_ids").to_pylist(), rows.column("sampled_logps").to_pylist()
    for i, (ids, logps, dtype) in enumerate(zip(ids_col, logp_col, rows.column("logp_dtype").to_pylist(),
                                                strict=True)):
        row = f"{where} row {first_row + i}"
        if dtype != judge_dtype:
            raise UntrustedSampledLogps(
                f"{row}: sampled log-probs were computed in {dtype}, the judge runs in {judge_dtype}; mixing "
                "precisions shifts Eq. 7's margins. Set model.dtype so both match, or judge.policy_logps: rescore")
        if ids is None or logps is None or len(ids) < k or len(logps) < k or any(
                x is None or x != x for x in logps[:k]):
            raise UntrustedSampledLogps(f"{row}: sampled log-probs are missing for some responses; sample again "
                                        "or set judge.policy_logps: rescore")
    return Sampled([row[:k] for row in ids_col], np.array([row[:k] for row in logp_col], dtype=np.float64))


class Judges:
    """The models a judge needs, loaded once per file: the implicit reward's policy and reference, an
    external reward model, or an LLM judge (docs/variants.md 6)."""

    def __init__(self, cfg: SPAConfig, t: int):
        from spa.models.loading import load_causal_lm
        from spa.models.rendering import load_tokenizer

        dtype, trc = cfg.model.dtype, cfg.model.trust_remote_code
        self.cfg, self.t = cfg, t
        policy_dir = model_dir(cfg, t - 1)
        self.tok = load_tokenizer(policy_dir, trc)
        self.policy = self.ref = self.rm = self.llm = self.verifier = None
        self.reuse = cfg.judge.type == "implicit" and cfg.judge.policy_logps == "from_sampling"
        self.policy_dir = policy_dir
        self.stats = {"responses": 0, "policy_rescored": 0}  # with reuse: responses pi_{t-1} had to rescore
        if cfg.judge.type == "implicit":
            # with reuse, pi_{t-1}'s half of Eq. 7 comes from sampling: only the reference runs
            self.policy = None if self.reuse else load_causal_lm(policy_dir, dtype, trust_remote_code=trc)
            ref_dir = reference_dir(cfg, t)
            self.ref = load_causal_lm(ref_dir, dtype, trust_remote_code=trc) if ref_dir is not None else None
        elif cfg.judge.type == "verifier":
            from spa.judges.verifier import task_index

            self.verifier = task_index(cfg.judge.instructions)
        elif cfg.judge.type == "external_rm":
            from spa.judges.reward_model import load_reward_model

            self.rm, self.rm_tok = load_reward_model(cfg.judge.reward_model, dtype, trc)
        else:
            path = cfg.judge.llm_judge_model or cfg.model.pi_init
            self.llm, self.llm_tok = load_causal_lm(path, dtype, trust_remote_code=trc), load_tokenizer(path, trc)

    @property
    def dtype(self) -> str:
        """The precision the judge's models compute in (what recorded sampling log-probs must match)."""
        from spa.models.loading import default_device, resolve_dtype

        model = self.ref if self.ref is not None else self.policy
        dtype = next(model.parameters()).dtype if model is not None else resolve_dtype(self.cfg.model.dtype,
                                                                                       default_device())
        return str(dtype).removeprefix("torch.")

    def inputs(self, rows: pa.Table, where: str, first_row: int = 0):
        """``(prompts, candidates, finished, sampled)`` of one chunk; ``sampled`` only when reusing."""
        prompts, cands, fins = candidates(rows, self.cfg)
        sampled = None
        if self.reuse:
            sampled = sampled_candidates(rows, len(cands[0]) if cands else 2, self.dtype, where, first_row)
        return prompts, cands, fins, sampled

    def score(self, prompts: list[str], cands: list[list[str]], fins: list[list[bool]],
              sampled: Sampled | None = None) -> Scores:
        from spa.judges.implicit_reward import implicit_reward
        from spa.models.logprobs import sequence_logps
        from spa.models.rendering import render

        cfg = self.cfg
        n, k = len(prompts), len(cands[0]) if cands else 2
        flat_p = [p for p in prompts for _ in range(k)]
        flat_y = [y for row in cands for y in row]
        flat_f = [f for row in fins for f in row]
        bs, ml = cfg.judge.batch_size, cfg.model.max_length
        nan = np.full(n * k, np.nan)
        if self.reuse:
            if sampled is None:
                raise ValueError("judge.policy_logps: from_sampling needs the sampled log-probs of each chunk")
            return self._score_reused(flat_p, flat_y, flat_f, sampled, n, k)
        if self.policy is not None:
            pol, counts = sequence_logps(self.policy, self.tok, flat_p, flat_y, flat_f, bs, ml)
            lens = response_lengths(counts, flat_f)
            ref = sequence_logps(self.ref, self.tok, flat_p, flat_y, flat_f, bs, ml)[0] if self.ref is not None else nan
            reward = implicit_reward(pol, ref if self.ref is not None else None, cfg.judge.beta).numpy()  # Eq. 4
            return Scores(reward.reshape(n, k), pol.reshape(n, k), ref.reshape(n, k), lens.reshape(n, k))
        lens = np.array([len(render(self.tok, p, y, False)[1]) for p, y in zip(flat_p, flat_y, strict=True)], np.int32)
        if self.verifier is not None:  # the share of each response's constraints it follows
            reward = np.array(self.verifier.scores(prompts, cands), dtype=np.float64).reshape(n, k)
            return Scores(reward, nan.reshape(n, k), nan.reshape(n, k), lens.reshape(n, k), decisive=True)
        if self.rm is not None:
            from spa.judges.reward_model import reward_scores

            reward = reward_scores(self.rm, self.rm_tok, flat_p, flat_y, bs, ml, finished=flat_f)
            return Scores(reward.reshape(n, k), nan.reshape(n, k), nan.reshape(n, k), lens.reshape(n, k))
        from spa.judges.llm import pairwise_preference

        p1 = pairwise_preference(self.llm, self.llm_tok, prompts, [c[0] for c in cands], [c[1] for c in cands],
                                 bs, ml)
        return Scores(nan.reshape(n, k), nan.reshape(n, k), nan.reshape(n, k), lens.reshape(n, k), p_first=p1)

    def _score_reused(self, flat_p: list[str], flat_y: list[str], flat_f: list[bool], sampled: Sampled, n: int,
                      k: int) -> Scores:
        """Eq. 7 with log pi_{t-1} taken from sampling wherever the sampled ids are exactly the ids the rendering
        path gives the response text (the ids every later stage uses); the other responses are rescored with
        pi_{t-1} (loaded on first need). The reference always scores the rendered ids, as in full rescoring."""
        from spa.judges.implicit_reward import implicit_reward
        from spa.models.loading import load_causal_lm
        from spa.models.logprobs import encode_pair, encoded_logps

        cfg = self.cfg
        encoded = [encode_pair(self.tok, p, y, f, cfg.model.max_length, row=i // k)
                   for i, (p, y, f) in enumerate(zip(flat_p, flat_y, flat_f, strict=True))]
        flat_ids = [ids for row in sampled.token_ids for ids in row]
        pol = sampled.logps.reshape(-1).copy()
        redo = [i for i, (e, ids) in enumerate(zip(encoded, flat_ids, strict=True))
                if e.input_ids[e.response_start:] != list(ids)]
        if redo:
            if self.policy is None:
                self.policy = load_causal_lm(self.policy_dir, cfg.model.dtype,
                                             trust_remote_code=cfg.model.trust_remote_code)
            pol[redo] = encoded_logps(self.policy, [encoded[i] for i in redo], self.tok.pad_token_id,
                                      cfg.judge.batch_size)[0]
        self.stats["responses"] += len(encoded)
        self.stats["policy_rescored"] += len(redo)
        lens = response_lengths([e.num_response_tokens for e in encoded], flat_f)
        if self.ref is None:
            ref = np.full(n * k, np.nan)
        else:
            ref = encoded_logps(self.ref, encoded, self.tok.pad_token_id, cfg.judge.batch_size)[0]
        reward = implicit_reward(pol, ref if self.ref is not None else None, cfg.judge.beta).numpy()  # Eq. 4
        return Scores(reward.reshape(n, k), pol.reshape(n, k), ref.reshape(n, k), lens.reshape(n, k))


def candidates(rows: pa.Table, cfg: SPAConfig) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The responses a judge compares: the first two (paper), or all ``n`` for best-vs-worst."""
    prompts = rows.column("prompt").to_pylist()
    responses = rows.column("responses").to_pylist()
    reasons = rows.column("finish_reasons").to_pylist()
    k = 2 if cfg.judge.select == "first_two" else cfg.sample.n
    for i, r in enumerate(responses):
        if len(r) < k:
            raise ValueError(f"responses row {i}: {len(r)} responses; this judge needs {k} per prompt "
                             f"(sample.n = {cfg.sample.n}, judge.select = {cfg.judge.select})")
    return prompts, [r[:k] for r in responses], [[x == "stop" for x in f[:k]] for f in reasons]
