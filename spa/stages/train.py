"""``spa seed`` and ``spa train --iteration t``: DPO on the seed, refined DPO on judged pairs.

Seed stage (docs/algorithm.md): ``pi_0 = DPO(pi_init, D_0)`` with ``pi_ref = pi_init``, 3 epochs.
Iteration t: from ``pi_{t-1}`` with ``pi_ref = pi_{t-1}``, 1 epoch, self-refinement (Eq. 9-10)
with de-coupled detection (Eq. 11-12, ``lambda_t``), ties left out. The round's decisions are
taken once, in :func:`spa.training.rounds.resolve_round`; the training itself is
:mod:`spa.training.worker` (in this process, or under torchrun).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import partial
from typing import Any

import pyarrow.compute as pc

from spa.config import PI_INIT_UNPAIRED, SPAConfig
from spa.errors import StageInputError
from spa.run.artifacts import read_table
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, content_hash, is_up_to_date
from spa.run.model_card import write_model_card
from spa.run.stage_runner import StageResult, expected_key, require, run_stage
from spa.training.rounds import TrainRound, resolve_round

# torch, transformers and the trainer are imported inside the functions that train, so that a stage
# that is already up to date answers in well under a second

SECTIONS = ["model", "train"]


def _device_name() -> str:
    from spa.models.loading import default_device

    return str(default_device())


def refinement_summary(cfg: SPAConfig, rnd: TrainRound) -> dict[str, Any]:
    """Where the refinement flags of the round landed: flagged shares, SR/DND disagreement, and their
    precision on injected flips and (with ``judge.oracle``) on the labels the oracle calls wrong."""
    import pyarrow.parquet as pq

    from spa.judges.diagnostics import refinement_diagnostics

    layout, t = RunLayout.of(cfg), rnd.t
    flags = pq.read_table(layout.refinement(t), columns=["prompt_id", "step", "z_sr", "z_dnd"]).to_pydict()
    # a judgments file written to the contract alone (docs/artifacts.md) may lack our extra 'flipped' column
    has_flips = "flipped" in pq.read_schema(layout.judgments(t)).names
    judged = pq.read_table(layout.judgments(t), columns=["prompt_id", "flipped"] if has_flips else ["prompt_id"])
    flipped = dict(zip(judged["prompt_id"].to_pylist(), judged["flipped"].to_pylist(), strict=True)) if has_flips else {}
    wrong = None
    if layout.oracle_verdicts(t).exists():
        v = pq.read_table(layout.oracle_verdicts(t)).to_pydict()
        verdict = dict(zip(v["prompt_id"], v["oracle_verdict"], strict=True))
        wrong = [None if verdict.get(p, 1.5) == 1.5 else verdict[p] == 2.0 for p in flags["prompt_id"]]
    diag = refinement_diagnostics(
        flags["step"], flags["z_sr"], flags["z_dnd"] if rnd.dnd_lambda > 0 else None,
        cfg.train.refinement.warmup_fraction, [bool(flipped.get(p, False)) for p in flags["prompt_id"]], wrong)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in diag.items()}


def run_key(cfg: SPAConfig, rnd: TrainRound) -> str:
    """What the round's checkpoints and reference log-probs belong to: the start model's and the data's content,
    the config sections (without the operational settings: a checkpoint written under one ``train.save_steps``
    resumes under another) and the iteration."""
    return hashlib.sha256(json.dumps(
        {"start": content_hash(rnd.start), "data": content_hash(rnd.data), "cfg": cfg.section_hash(*SECTIONS),
         "t": rnd.t} | ({"unpaired": content_hash(rnd.unpaired)} if rnd.unpaired is not None else {}),
        sort_keys=True).encode()).hexdigest()


def train_round(cfg: SPAConfig, rnd: TrainRound) -> dict[str, Any]:
    """Train the round (materialising its pairs first where needed) and summarise its train log."""
    from spa.training.data import build_training_set
    from spa.training.worker import launch, train_worker

    layout, t = RunLayout.of(cfg), rnd.t
    extra_summary = build_training_set(cfg, rnd) if rnd.training_set is not None else {}
    key = run_key(cfg, rnd)
    if cfg.train.world_size > 1:
        launch(cfg, t, key, layout.config)
    else:
        train_worker(cfg, t, key)
    log = read_table(layout.train_log(t), "train_log")
    shutil.rmtree(layout.checkpoints(t), ignore_errors=True)  # the stage is done; keep only pi_t
    write_model_card(cfg, t)  # lineage and config now; the evaluate stage adds its numbers
    losses = log.column("loss").to_pylist()
    return {
        "steps": log.num_rows, "first_loss": losses[0], "final_loss": losses[-1],
        "mean_refined_fraction": float(pc.mean(log.column("refined_fraction")).as_py()),
        "device": _device_name(), "processes": cfg.train.world_size, "loss": rnd.loss.kind.value,
        **extra_summary, **(refinement_summary(cfg, rnd) if rnd.refines else {}),
        **(unpaired_summary(log) if rnd.unpaired is not None else {}),
    }


def unpaired_summary(log) -> dict[str, Any]:
    """SSPO / DPO+SFT: how many unpaired responses were trained on; for SSPO where the threshold and the curriculum
    ended and the share of responses pseudo-labelled winning over the last tenth of the steps."""
    rows = log.to_pylist()
    out: dict[str, Any] = {"unpaired_rows_trained": int(sum(r["unpaired_rows"] or 0 for r in rows))}
    if rows and rows[-1].get("sspo_g") is not None:
        tail = [r["sspo_positive_share"] for r in rows[-max(1, len(rows) // 10):] if r["sspo_positive_share"] is not None]
        out |= {"sspo_final_g": round(rows[-1]["sspo_g"], 4), "sspo_final_delta": round(rows[-1]["sspo_delta"], 4),
                "sspo_threshold_updates": int(sum(r["sspo_threshold_updated"] for r in rows)),
                "sspo_late_positive_share": round(sum(tail) / len(tail), 4) if tail else None}
    return out


def run(cfg: SPAConfig, t: int, force: bool = False, echo=print) -> StageResult:
    """The seed stage (``t = 0``) or the training of iteration ``t``."""
    if t == 0 and cfg.model.pi_0:
        raise ValueError("model.pi_0 is set (no-seed mode): the seed stage is skipped")
    rnd = resolve_round(cfg, t)
    if t == 0:
        require(rnd.data, "the seed set", "spa prepare")
    else:
        require(rnd.start, rnd.start_name, "spa train" if t > 1 else "spa seed")
        require(rnd.data, "judgments", f"spa judge --iteration {t}")
    if rnd.unpaired is not None and cfg.data.unpaired_source == PI_INIT_UNPAIRED:
        from spa.stages import unpaired

        if cfg.train.nnodes == 1:
            unpaired.run(cfg, echo=echo)  # pi_init's answers to X_1..X_T, sampled once (its own manifest entry)
        elif not unpaired.is_drawn(cfg):  # the other nodes' torchrun could not wait for node 0's sampling
            raise StageInputError(f"{RunLayout.of(cfg).unpaired}: the unpaired set drawn from pi_init is missing or "
                                  f"out of date; with train.nnodes > 1, draw it first on one node (spa unpaired -c "
                                  f"<config>), then start the seed stage on every node")
    elif rnd.unpaired is not None:
        require(rnd.unpaired, "the unpaired set", "spa prepare")
    if cfg.train.nnodes > 1:
        from spa.training.worker import node_rank

        if node_rank(cfg) > 0:
            return follow(cfg, rnd, force, echo)
    return run_stage(cfg, rnd.stage_key, rnd.inputs, SECTIONS, list(rnd.outputs),
                     partial(train_round, cfg, rnd), extra_key={"iteration": t}, force=force, echo=echo)


def follow(cfg: SPAConfig, rnd: TrainRound, force: bool = False, echo=print) -> StageResult:
    """The stage on a node other than the first (``train.nnodes > 1``): its torchrun joins the first node's and
    nothing else is done here. Node 0's stage materialises the pairs before its torchrun meets the others, and
    writes the summary, model card and manifest entry after; this node writes nothing itself (its workers do
    what their global ranks do, in the shared run directory)."""
    from spa.training.worker import launch, node_rank

    layout, key, outputs = RunLayout.of(cfg), rnd.stage_key, [str(o) for o in rnd.outputs]
    expected = expected_key(cfg, rnd.inputs, SECTIONS, {"iteration": rnd.t})
    if not force and is_up_to_date(Manifest(layout.manifest), key, expected):  # node 0 skips it too
        echo(f"[{key}] up to date (same inputs and config); nothing to do")
        return StageResult(key, True, outputs, {})
    launch(cfg, rnd.t, run_key(cfg, rnd), layout.config)
    echo(f"[{key}] node {node_rank(cfg)} of {cfg.train.nnodes}: done (node 0 records the stage)")
    return StageResult(key, False, outputs, {})
