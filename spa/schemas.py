"""Arrow schemas of every artifact (docs/artifacts.md): the one home of column names and types.

Each artifact kind names its required columns (the contract) and the row rules a reader
checks. Stages may add columns; the required ones must exist with these types. The
``*_WRITTEN`` schemas are the full column sets our own stages write (the contract plus
their extra columns).
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

REFINEMENT = ArtifactKind(
    name="refinement flags",
    schema=pa.schema([
        ("prompt_id", pa.string()), ("step", pa.int64()), ("confidence_sr", pa.float64()),
        ("confidence_dnd", pa.float64()), ("z_sr", pa.bool_()), ("z_dnd", pa.bool_()),
    ]),
    nonempty=("prompt_id",),
)

ORACLE_VERDICTS = ArtifactKind(
    name="oracle verdicts",
    # 1.0: the oracle agrees with the label, 2.0: it prefers the rejected answer, 1.5: no preference
    schema=pa.schema([("prompt_id", pa.string()), ("oracle_verdict", pa.float64())]),
    nonempty=("prompt_id",),
    unique="prompt_id",
)

# SSPO's unpaired set D_U (docs/variants.md 7): one response per row, no label; a prompt may repeat
UNPAIRED = ArtifactKind(
    name="unpaired responses",
    schema=pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("response", pa.string())]),
    nonempty=("prompt_id", "prompt", "response"),
)

# seed and held-out pairs as ``spa prepare`` writes them: with the 0-based row of data.source each one is, so that a
# later stage can name a bad pair by its source row (the files are in the shuffle's order)
PAIRS_WRITTEN = pa.schema(list(PREFERENCE_PAIRS.schema) + [pa.field("source_row", pa.int64())])
UNPAIRED_WRITTEN = pa.schema(list(UNPAIRED.schema) + [pa.field("source_row", pa.int64())])  # prepare: the row of data.unpaired_source; pi_init: the row in X_1..X_T
# drawn from pi_init (data.unpaired_source: pi_init): False where the answer stopped at sample.max_new_tokens, so that
# training does not end a cut-off answer with the end-of-turn token (a file read by prepare holds finished answers)
UNPAIRED_DRAWN = pa.schema(list(UNPAIRED_WRITTEN) + [pa.field("finished", pa.bool_())])

RESPONSES_WRITTEN = pa.schema(list(RESPONSES.schema) + [
    pa.field("backend", pa.string()),
    # what the judge's ``policy_logps: from_sampling`` reuses (bench P3): the sampled ids (stop token included
    # when finished), the sum of their raw log-probs under pi_{t-1}, and the precision they were computed in
    pa.field("token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("sampled_logps", pa.list_(pa.float64())),
    pa.field("logp_dtype", pa.string()),
])

JUDGMENTS_WRITTEN = pa.schema(list(JUDGMENTS.schema) + [
    pa.field("chosen_finished", pa.bool_()), pa.field("rejected_finished", pa.bool_()),
    pa.field("chosen_tokens", pa.int32()), pa.field("rejected_tokens", pa.int32()),
    pa.field("first_is_chosen", pa.bool_()), pa.field("dropped", pa.bool_()),
    pa.field("chosen_index", pa.int32()), pa.field("rejected_index", pa.int32()),
    pa.field("flipped", pa.bool_()),
])

TRAIN_LOG_WRITTEN = pa.schema(list(TRAIN_LOG.schema) + [
    ("logps_chosen", pa.float64()), ("logps_rejected", pa.float64()), ("rewards_chosen", pa.float64()),
    ("rewards_accuracies", pa.float64()),
    ("rpo_diag_weight", pa.float64()),  # RPO: mean weight of a pair's own entry (docs/variants.md 2.6, item 2)
    ("dro_max_weight", pa.float64()),  # DRO: the largest pair weight of the step (docs/variants.md 3.3, item 7)
    ("dro_group_size", pa.float64()),  # DRO: the pairs its weights were solved over (the micro-batch's unflagged)
    ("dro_moved_fraction", pa.float64()),  # DRO: the largest share of a group's mass the worst case moved to xi_min
    ("spo_acc_pref", pa.float64()), ("spo_acc_dispref", pa.float64()),  # SPO heads' accuracy (paper: > 90%)
    # SSPO (docs/variants.md 7): the curriculum's gold share g, the threshold delta_t, the running statistics,
    # the share of the step's unpaired responses labelled winning, the two loss terms; DPO+SFT: the SFT term
    ("sspo_g", pa.float64()), ("sspo_delta", pa.float64()), ("sspo_mu", pa.float64()), ("sspo_sigma", pa.float64()),
    ("sspo_positive_share", pa.float64()), ("sspo_threshold_updated", pa.float64()),
    ("gold_loss", pa.float64()), ("unpaired_loss", pa.float64()), ("unpaired_rows", pa.float64()),
])

PSEUDO_LABELS = ArtifactKind(
    name="SSPO pseudo-labels",
    schema=pa.schema([
        ("prompt_id", pa.string()),  # the unpaired row's prompt id (<run>/data/unpaired.parquet)
        ("row", pa.int32()),  # its row in <run>/data/unpaired.parquet
        ("step", pa.int64()),  # the optimiser step that trained on it (0-based)
        ("reward", pa.float64()),  # SimPO's reward beta / |y| * log pi_theta(y|x)
        ("z", pa.float64()),  # normalised with the running statistics, clipped to +-5
        ("delta", pa.float64()),  # the threshold it was compared with
        ("label", pa.bool_()),  # z > delta: taken as winning
    ]),
)

FINISH_REASONS = frozenset({"stop", "length"})

KINDS: dict[str, ArtifactKind] = {
    "seed": PREFERENCE_PAIRS,
    "heldout": PREFERENCE_PAIRS,
    "pairs": PREFERENCE_PAIRS,
    "prompts": PROMPTS,
    "unpaired": UNPAIRED,
    "responses": RESPONSES,
    "judgments": JUDGMENTS,
    "reference_logps": REFERENCE_LOGPS,
    "train_log": TRAIN_LOG,
    "refinement": REFINEMENT,
    "pseudo_labels": PSEUDO_LABELS,
    "oracle_verdicts": ORACLE_VERDICTS,
    "eval": EVAL,
}
