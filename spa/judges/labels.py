"""Labels from judge scores: which response of a row is chosen, ``p_chosen``, ties and injected flips.

Pure functions over one chunk's :class:`spa.judges.scoring.Scores` (no model, no file): Eq. 7-8 through the tested
functions of :mod:`spa.judges.implicit_reward` (or best-vs-worst selection), label-noise injection, and the rows of
``judgments.parquet``. The judge stage (:mod:`spa.stages.judge`) streams files through them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from spa.config import SPAConfig
from spa.judges.scoring import Scores


def judge_name(cfg: SPAConfig, length_penalty: float | None = None) -> str:
    j = cfg.judge
    a = j.length_penalty if length_penalty is None else length_penalty
    a_text = f"{a:.6g}" if isinstance(a, float | int) else str(a)
    if j.type == "implicit":
        reuse = ",policy_logps=from_sampling" if j.policy_logps == "from_sampling" else ""
        base = f"implicit(ref={j.reference},beta={j.beta},length_penalty={a_text}{reuse})"
    elif j.type == "external_rm":
        base = f"external_rm({Path(j.reward_model or '').name},length_penalty={a_text})"
    elif j.type == "verifier":
        base = f"verifier({Path(j.instructions or '').name})"
    else:
        base = f"llm_judge({Path(j.llm_judge_model or cfg.model.pi_init).name},both_orders)"
    if j.select == "best_worst":
        base += f"+best_worst(n={cfg.sample.n})"
    if j.flip_fraction:
        base += f"+flip({j.flip_fraction})"
    return base


def flip_mask(prompt_ids: list[str], fraction: float, seed: int, t: int) -> np.ndarray:
    """Label-noise injection: each prompt's label flips with probability ``fraction``, decided by a
    hash of (seed, iteration, prompt id) so that shards and reruns flip the same rows."""
    if fraction <= 0:
        return np.zeros(len(prompt_ids), dtype=bool)
    u = [int.from_bytes(hashlib.sha256(f"{seed}\0{t}\0{pid}".encode()).digest()[:8], "little") / 2**64
         for pid in prompt_ids]
    return np.array(u) < fraction


def pick_pairs(scores: Scores, cands: list[list[str]], cfg: SPAConfig, prompt_ids: list[str], t: int,
               length_penalty: float) -> tuple[np.ndarray, ...]:
    """Which candidate is chosen and which rejected per row (Eq. 8, or best-vs-worst), ``p_chosen`` (Eq. 7
    with Eq. 13's penalty), ties, and the injected flips: ``(ci, ri, p_chosen, tie, flipped)``."""
    import torch

    from spa.judges.implicit_reward import assign_labels, length_penalised, preference, select_pairs

    reward, lens = torch.from_numpy(scores.reward), torch.from_numpy(scores.lens)
    score = length_penalised(reward, lens, length_penalty)  # Eq. 13 on Eq. 4's rewards
    rows_idx = torch.arange(len(cands))
    if cfg.judge.select == "best_worst":
        ci, ri = (x.numpy() for x in select_pairs(reward, lens, length_penalty))
        tie = ci == ri
    else:
        p1 = scores.p_first if scores.p_first is not None else preference(score[:, 0], score[:, 1]).numpy()  # Eq. 7
        first, tie = (x.numpy() for x in assign_labels(torch.from_numpy(p1)))  # Eq. 8; a tie keeps y1 first
        ci = np.where(first | tie, 0, 1)
        ri = 1 - ci
    if scores.p_first is not None:  # a pairwise judge (LLM judge): its own p(y1 > y2)
        p_chosen = np.where(ci == 0, scores.p_first, 1.0 - scores.p_first)
    else:  # Eq. 7 for (chosen, rejected); the verifier's preference is certain
        p_chosen = preference(score[rows_idx, ci], score[rows_idx, ri]).numpy()
        p_chosen = np.where(p_chosen > 0.5, 1.0, 0.5) if scores.decisive else p_chosen
    identical = np.array([c[i] == c[j] for c, i, j in zip(cands, ci, ri, strict=True)]) | np.array(
        [i == j for i, j in zip(ci, ri, strict=True)])
    tie = tie | identical  # identical texts are a tie even if padding nudged the numbers
    p_chosen = np.where(tie, 0.5, p_chosen)
    ri = np.where(tie & (ci == ri), (ci + 1) % len(cands[0]), ri)  # a tie row still names two responses
    flipped = flip_mask(prompt_ids, cfg.judge.flip_fraction, cfg.sample.seed, t) & ~tie
    ci, ri = np.where(flipped, ri, ci), np.where(flipped, ci, ri)
    p_chosen = np.where(flipped, 1.0 - p_chosen, p_chosen)
    return ci, ri, p_chosen, tie, flipped


def label_rows(rows: pa.Table, scores: Scores, cands: list[list[str]], fins: list[list[bool]], cfg: SPAConfig,
               t: int, length_penalty: float) -> pa.Table:
    """Eq. 7-8 (or best-vs-worst selection) on scored candidates -> judgments rows."""
    n = len(cands)
    ci, ri, p_chosen, tie, flipped = pick_pairs(scores, cands, cfg, rows.column("prompt_id").to_pylist(), t,
                                                length_penalty)
    rows_idx = np.arange(n)

    def chosen_of(m: np.ndarray) -> np.ndarray:
        return m[rows_idx, ci]

    def rejected_of(m: np.ndarray) -> np.ndarray:
        return m[rows_idx, ri]

    text = np.empty((n, len(cands[0]) if n else 2), dtype=object)
    for i, row in enumerate(cands):
        text[i, :] = row
    fin = np.array(fins, dtype=bool).reshape(n, -1) if n else np.zeros((0, 2), dtype=bool)
    truncated = ~(chosen_of(fin) & rejected_of(fin))
    return pa.table({
        "prompt_id": rows.column("prompt_id"),
        "prompt": rows.column("prompt"),
        "chosen": pa.array(chosen_of(text).tolist(), pa.string()),
        "rejected": pa.array(rejected_of(text).tolist(), pa.string()),
        "p_chosen": pa.array(p_chosen, pa.float64()),
        "policy_logp_chosen": pa.array(chosen_of(scores.policy), pa.float64(), from_pandas=True),
        "policy_logp_rejected": pa.array(rejected_of(scores.policy), pa.float64(), from_pandas=True),
        "ref_logp_chosen": pa.array(chosen_of(scores.ref), pa.float64(), from_pandas=True),
        "ref_logp_rejected": pa.array(rejected_of(scores.ref), pa.float64(), from_pandas=True),
        "tie": pa.array(tie, pa.bool_()),
        "judge": pa.array([judge_name(cfg, length_penalty)] * n, pa.string()),
        "chosen_finished": pa.array(chosen_of(fin), pa.bool_()),
        "rejected_finished": pa.array(rejected_of(fin), pa.bool_()),
        "chosen_tokens": pa.array(chosen_of(scores.lens), pa.int32()),
        "rejected_tokens": pa.array(rejected_of(scores.lens), pa.int32()),
        "first_is_chosen": pa.array(ci < ri, pa.bool_()),
        "dropped": pa.array(truncated & cfg.judge.drop_truncated, pa.bool_()),
        "chosen_index": pa.array(ci, pa.int32()),
        "rejected_index": pa.array(ri, pa.int32()),
        "flipped": pa.array(flipped, pa.bool_()),
    })
