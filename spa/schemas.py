"""Arrow schemas of the artifact contract (`../shared/spec/ARTIFACTS.md`).

Each artifact kind names its required columns and the row rules a reader
checks. Stages may add columns; the required ones must exist with these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass(frozen=True)
class ArtifactKind:
    """One artifact of the contract: its schema and the row-level rules."""

    name: str
    schema: pa.Schema
    # string columns that must be non-null and non-blank
    nonempty: tuple[str, ...] = ()
    # a column whose values must be unique
    unique: str | None = None
    # pairs of string columns that must differ on every row
    distinct: tuple[tuple[str, str], ...] = ()
    # list columns that must have the same length on each row
    same_length: tuple[str, ...] = field(default=())


PREFERENCE_PAIRS = ArtifactKind(
    name="preference pairs",
    schema=pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
        ]
    ),
    nonempty=("prompt_id", "prompt", "chosen", "rejected"),
    unique="prompt_id",
    distinct=(("chosen", "rejected"),),
)

PROMPTS = ArtifactKind(
    name="prompt batch",
    schema=pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())]),
    nonempty=("prompt_id", "prompt"),
    unique="prompt_id",
)

RESPONSES = ArtifactKind(
    name="responses",
    schema=pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("responses", pa.list_(pa.string())),
            ("finish_reasons", pa.list_(pa.string())),
            ("num_tokens", pa.list_(pa.int32())),
            ("model", pa.string()),
        ]
    ),
    nonempty=("prompt_id", "prompt", "model"),
    unique="prompt_id",
    same_length=("responses", "finish_reasons", "num_tokens"),
)

JUDGMENTS = ArtifactKind(
    name="judgments",
    schema=pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("chosen", pa.string()),
            ("rejected", pa.string()),
            ("p_chosen", pa.float64()),
            ("policy_logp_chosen", pa.float64()),
            ("policy_logp_rejected", pa.float64()),
            ("ref_logp_chosen", pa.float64()),
            ("ref_logp_rejected", pa.float64()),
            ("tie", pa.bool_()),
            ("judge", pa.string()),
        ]
    ),
    nonempty=("prompt_id", "prompt", "judge"),
    unique="prompt_id",
)

TRAIN_LOG = ArtifactKind(
    name="train log",
    schema=pa.schema(
        [
            ("step", pa.int64()),
            ("loss", pa.float64()),
            ("lr", pa.float64()),
            ("margin_mean", pa.float64()),
            ("tau", pa.float64()),
            ("refined_fraction", pa.float64()),
        ]
    ),
    unique="step",
)

EVAL = ArtifactKind(
    name="evaluation outputs",
    schema=pa.schema(
        [
            ("instruction", pa.string()),
            ("output", pa.string()),
            ("generator", pa.string()),
        ]
    ),
    nonempty=("instruction", "generator"),
)

REFERENCE_LOGPS = ArtifactKind(
    name="reference log-probs",
    schema=pa.schema(
        [
            ("row", pa.int32()),  # index into the stage's training pairs
            ("ref_logp_chosen", pa.float64()),
            ("ref_logp_rejected", pa.float64()),
        ]
    ),
    unique="row",
)

FINISH_REASONS = frozenset({"stop", "length"})

KINDS: dict[str, ArtifactKind] = {
    "seed": PREFERENCE_PAIRS,
    "heldout": PREFERENCE_PAIRS,
    "pairs": PREFERENCE_PAIRS,
    "prompts": PROMPTS,
    "responses": RESPONSES,
    "judgments": JUDGMENTS,
    "reference_logps": REFERENCE_LOGPS,
    "train_log": TRAIN_LOG,
    "eval": EVAL,
}
