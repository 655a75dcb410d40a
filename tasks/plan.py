"""The resolved rounds of a run, printed before any heavy work (``spa plan``).

docs/guarantees.md, "The recipe": which model each round samples from, which reference the judge and the
trainer use, whether prompts are fresh, the pairing rule and the schedule (lambda per iteration,
optimiser steps) are config; users see them resolved here, with what a rerun would redo, before
they spend GPU hours. Reads the config, the manifest, Parquet footers and the source's hash: no model is
loaded or hashed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spa.config import PI_INIT_UNPAIRED, LossKind, SPAConfig
from spa.run.layout import RunLayout
from spa.run.manifest import Manifest, Stage, code_version, hash_inputs
from spa.training.rounds import resolve_round


def _stage_sections() -> dict[str, list[str]]:
    """Config sections each stage's resume key covers: the stages' own ``SECTIONS``."""
    from spa.stages import evaluate, judge, prepare, sample, train

    return {"prepare": prepare.SECTIONS, "seed": train.SECTIONS, "sample": sample.SECTIONS, "judge": judge.SECTIONS,
            "train": train.SECTIONS, "evaluate": evaluate.SECTIONS}


@dataclass
class Round:
    """One round of Algorithm 1: the seed stage (``t = 0``) or an SPA iteration."""

    t: int
    lines: list[tuple[str, str]]  # (what, resolved description)
    stages: dict[str, str] = field(default_factory=dict)  # stage key -> status


def _rows(path: Path) -> int | None:
    """Row count from a Parquet footer (None when the file is not there yet)."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def _size(size: float, rows: int | None, noun: str) -> str:
    if rows is not None:
        return f"{rows} {noun}"
    if size < 1:
        return f"{size:.0%} of the source's {noun} (resolved by prepare)"
    return f"{int(size)} {noun}"


def _steps(pairs: int | None, size: float, epochs: float, batch: int) -> str:
    n = pairs if pairs is not None else (int(size) if size >= 1 else None)
    if n is None:
        return f"{epochs:g} epoch(s) of {batch}-pair steps"
    return f"<= {math.ceil(n * epochs / batch)} optimiser steps ({n} pairs x {epochs:g} epoch(s) / batch {batch})"


def _judge_text(cfg: SPAConfig, t: int) -> str:
    j = cfg.judge
    policy = f"pi_{t - 1}"
    if j.type == "implicit":
        ref = {"init": "pi_init", "none": "no reference"}.get(j.reference)
        if j.reference == "previous":
            ref = f"pi_{t - 2}" if t >= 2 else "pi_init"
        text = f"implicit reward (Eq. 7) of {policy} against {ref}, beta {j.beta:g}"
        if j.policy_logps == "from_sampling":
            text += f", {policy}'s log-probs reused from sampling"
    elif j.type == "external_rm":
        text = f"external reward model {j.reward_model}"
    else:
        text = f"LLM judge {j.llm_judge_model or 'pi_init'} (both orders)"
    if j.length_penalty == "auto":
        text += (", length penalty a solved per round (" + ("either sign" if j.length_penalty_sign == "signed"
                                                           else "a >= 0, Eq. 13") + ")")
    elif j.length_penalty not in (0, 0.0):
        text += f", length penalty {j.length_penalty}"
    text += "; pair: " + ("best vs worst of the samples" if j.select == "best_worst" else "the first two samples")
    if j.flip_fraction:
        text += f"; {j.flip_fraction:.0%} of labels flipped on purpose (noise injection)"
    return text


def _loss_text(cfg: SPAConfig, t: int) -> str:
    tc, rnd = cfg.train, resolve_round(cfg, t)  # the trainer's own resolution
    text = rnd.loss.kind.label
    if rnd.loss.kind is LossKind.SSPO:
        s = tc.sspo
        reward = (f"SimPO reward beta {s.beta:g}" if s.reward == "simpo"
                  else f"DPO's implicit reward beta {tc.beta:g} (unpaired loss beta {s.beta:g})")
        text += (f" (gold pairs + pseudo-labelled unpaired answers), {reward}, margin {s.margin:g}, "
                 f"prior {s.prior:g}, threshold {s.threshold}, curriculum decay {s.decay:g}")
    elif rnd.loss.kind is LossKind.DPO_SFT:
        text += f" (DPO on the pairs + {tc.dpo_sft.weight:g} x NLL of the unpaired answers), beta {tc.beta:g}"
    else:
        text += f", beta {tc.beta:g}"
    text += f", lr {tc.learning_rate:g} ({tc.lr_scheduler}, {tc.warmup_ratio:.0%} warm-up)"
    if rnd.refine is not None:
        r, lam = rnd.refine, rnd.dnd_lambda
        text += (f"; SR: label smoothing {r.alpha:g} on the {r.k_percent:g}% least confident of the last "
                 f"{r.window} pairs after {r.warmup_fraction:.0%} of the steps")
        text += f"; DND lambda {lam:g}" if lam > 0 else "; DND off (pi_theta's own confidence)"
    if tc.lora is not None:
        text += f"; LoRA r {tc.lora.r}" + (", bf16 frozen base" if tc.lora.base_dtype == "bfloat16" else "")
    return text


def stage_status(cfg: SPAConfig, keys: list[str]) -> dict[str, str]:
    """What a rerun would do with each stage: ``done``, ``to run`` or ``reruns (why)``.

    A stage reruns when it has no manifest entry, when its config sections or the code version changed
    since it finished, when an output is gone, or when a stage it depends on reruns (every earlier
    non-evaluation stage: each model feeds all later rounds). Outputs are checked for existence only:
    ``spa plan`` never hashes weights.
    """
    layout = RunLayout.of(cfg)
    entries = Manifest(layout.manifest).entries()
    sections = _stage_sections()
    status: dict[str, str] = {}
    upstream = False
    for key in keys:
        entry = entries.get(key)
        kind = key.split("/")[0]
        reason = None
        if entry is None:
            reason = "to run"
        elif entry.get("config_hash") != cfg.section_hash(*sections[kind]):
            reason = "reruns (config changed)"
        elif entry.get("code_version") != code_version():
            reason = f"reruns (spa {entry.get('code_version')} -> {code_version()})"
        elif kind == "prepare" and not _same_source(cfg, entry, layout.root):
            reason = "reruns (the source changed)"
        elif any(not (layout.root / out).exists() for out in entry.get("outputs", {})):
            reason = "reruns (an output is missing)"
        elif upstream:
            reason = "reruns (an earlier stage reruns)"
        status[key] = reason or "done"
        if reason and kind != "evaluate":
            upstream = True
    return status


def _same_source(cfg: SPAConfig, entry: dict[str, Any], root: Path) -> bool:
    """prepare's input is the preference source: a local file or folder hashed here (data, not weights; cheap
    next to a run), a hub dataset by repo id, split and the commit its revision resolves to now."""
    from spa.data.sources import resolve_source
    from spa.errors import BadInput

    try:
        source = resolve_source(cfg.data.source, cfg.data.split, cfg.data.revision) if cfg.data.source else None
    except BadInput:  # gone, or a hub id neither the cache nor the hub knows now
        source = None
    if source is None:
        return not entry.get("inputs") and "source_ref" not in (entry.get("extra") or {})
    if source.kind == "hub":
        return (entry.get("extra") or {}).get("source_ref") == source.ref()
    return entry.get("inputs") == hash_inputs(source.inputs(), root)


def _iteration_lines(cfg: SPAConfig, t: int, batch: str | None) -> list[tuple[str, str]]:
    """Iteration ``t``'s resolved lines; ``batch``: the prompt batch ``spa expand`` took its prompts from."""
    layout, tc, sc = RunLayout.of(cfg), cfg.train, cfg.sample
    n_prompts = _rows(layout.prompts(t))
    if batch is None:
        size = cfg.data.prompt_sizes[t - 1]
        prompts = _size(size, n_prompts, "prompts")
    else:
        size, prompts = n_prompts or 0, f"{'the' if n_prompts is None else n_prompts} prompts of {batch} (spa expand)"
    return [
        ("sample", f"X_{t}: {prompts} (fresh: disjoint from every earlier set), {sc.n} responses each from "
                   f"pi_{t - 1} (T {sc.temperature:g}, top_p {sc.top_p:g}, {sc.max_new_tokens} new tokens, "
                   f"backend {sc.backend}{_sample_compute(cfg)})"),
        ("judge", _judge_text(cfg, t)),
        ("train", f"pi_{t - 1} -> pi_{t}, reference pi_{t - 1}{_ref_mode(cfg, t)}, "
                  f"{_steps(n_prompts, size, tc.epochs, tc.batch_size)}"
                  + (f", plus {tc.replay_fraction:.0%} replayed seed pairs" if tc.replay_fraction else "")
                  + _train_compute(cfg)),
        ("loss", _loss_text(cfg, t)),
        ("evaluate", _eval_text(cfg, t)),
    ]


def iterations(cfg: SPAConfig) -> dict[int, str | None]:
    """The run's iterations: ``1..T`` of the config, then those ``spa expand`` added (with their batch file)."""
    from spa.data.expansion import expanded_iterations

    added = {t: f for t, f in expanded_iterations(RunLayout.of(cfg)).items() if t > cfg.iterations}
    return {**dict.fromkeys(range(1, cfg.iterations + 1)), **dict(sorted(added.items()))}


def plan(cfg: SPAConfig) -> list[Round]:
    """The rounds of ``cfg`` resolved: seed (``t = 0``), iterations ``1..T`` (Algorithm 1), then the rounds
    ``spa expand`` added."""
    layout = RunLayout.of(cfg)
    d = cfg.data
    rounds = []
    seed_rows = _rows(layout.seed)
    if cfg.model.pi_0:
        seed_lines = [("train", f"skipped: pi_0 given ({cfg.model.pi_0}), no-seed mode")]
    else:
        unpaired_rows = _rows(layout.unpaired) if resolve_round(cfg, 0).unpaired is not None else None
        seed_lines = [
            ("data", f"D_0: {_size(d.seed_size, seed_rows, 'gold pairs')}{_unpaired_text(cfg, unpaired_rows)}"),
            ("train", f"pi_init -> pi_0, {_reference_text(cfg, 0)}, {_seed_steps(cfg, seed_rows, unpaired_rows)}"
                      f"{_train_compute(cfg)}"),
            ("loss", _loss_text(cfg, 0)),
            ("evaluate", _eval_text(cfg, 0)),
        ]
    rounds.append(Round(0, seed_lines))
    ts = iterations(cfg)
    rounds += [Round(t, _iteration_lines(cfg, t, batch)) for t, batch in ts.items()]
    drawn = not cfg.model.pi_0 and cfg.train.loss.uses_unpaired and d.unpaired_source == PI_INIT_UNPAIRED
    keys = {0: ["prepare"] + (["unpaired"] if drawn else []) + ([] if cfg.model.pi_0 else ["seed", "evaluate/0"])}
    for t in ts:
        keys[t] = [s.key(t) for s in (Stage.SAMPLE, Stage.JUDGE, Stage.TRAIN, Stage.EVALUATE)]
    status = stage_status(cfg, [k for t in sorted(keys) for k in keys[t]])
    for r in rounds:
        r.stages = {k: status[k] for k in keys[r.t]}
    return rounds


def _train_compute(cfg: SPAConfig) -> str:
    """Where training runs: world size (nodes x processes per node) and what each rank holds (#18)."""
    tc = cfg.train
    world = tc.nnodes * tc.num_processes
    if world == 1:
        return "; 1 process"
    where = f"{tc.nnodes} nodes x {tc.num_processes}" if tc.nnodes > 1 else f"{tc.num_processes}"
    if tc.sharding == "fsdp":
        how = ("FSDP: the frozen base and the adapter sharded over the ranks" if tc.lora is not None
               else "FSDP: parameters, gradients and optimiser state sharded over the ranks")
    else:
        how = "data parallel: every rank holds the whole model"
    rdzv = f", rendezvous {tc.rdzv_endpoint}" if tc.nnodes > 1 and tc.rdzv_endpoint else ""
    return f"; world size {world} ({where} processes{rdzv}), {how}"


def _sample_compute(cfg: SPAConfig) -> str:
    sc = cfg.sample
    if sc.gpus_per_engine == 1:
        return ""
    return (f", {sc.gpus_per_engine} GPUs per engine (tensor parallel {sc.tensor_parallel_size} x pipeline "
            f"parallel {sc.pipeline_parallel_size})")


def _unpaired_text(cfg: SPAConfig, rows: int | None) -> str:
    """SSPO / DPO+SFT: the unpaired set beside the seed (empty for every other loss)."""
    if not cfg.train.loss.uses_unpaired:
        return ""
    if rows is not None:
        return f"; D_U: {rows} unpaired answers"
    size, src = cfg.data.unpaired_size, cfg.data.unpaired_source
    if src == PI_INIT_UNPAIRED:
        share = "every prompt" if size is None else f"{int(size)} prompts" if size >= 1 else f"{size:.0%} of the prompts"
        return f"; D_U: one pi_init sample for {share} of X_1..X_{cfg.iterations} (sampled by the seed stage)"
    share = "the rows" if size is None else f"{int(size)} rows" if size >= 1 else f"{size:.0%}"
    return f"; D_U: {share} of {src} (counted by prepare)"


def _reference_text(cfg: SPAConfig, t: int) -> str:
    if not resolve_round(cfg, t).needs_reference:
        return "no reference (SSPO's reward is reference-free)"
    return f"reference pi_init{_ref_mode(cfg, t)}"


def _seed_steps(cfg: SPAConfig, pairs: int | None, unpaired: int | None) -> str:
    tc, d = cfg.train, cfg.data
    if not tc.loss.uses_unpaired:
        return _steps(pairs, d.seed_size, tc.seed_epochs, tc.batch_size)
    if pairs is None or unpaired is None:
        return f"{tc.seed_epochs:g} epoch(s) of {tc.batch_size}-row steps over the pairs and the unpaired answers"
    return (f"<= {math.ceil((pairs + unpaired) * tc.seed_epochs / tc.batch_size)} optimiser steps "
            f"({pairs} pairs + {unpaired} unpaired x {tc.seed_epochs:g} epoch(s) / batch {tc.batch_size})")


def _ref_mode(cfg: SPAConfig, t: int) -> str:
    if cfg.train.lora is not None:
        return " (the base weights, adapter disabled)"
    rnd = resolve_round(cfg, t)
    if rnd.precompute_reference:
        return " (log-probs computed once before training)"
    return " (model in memory: SSPO's implicit reward)" if rnd.loss.kind is LossKind.SSPO else " (model in memory: DND)"


def _eval_text(cfg: SPAConfig, t: int) -> str:
    e = cfg.evaluate
    what = e.eval_set if e.eval_set != "heldout" else "the held-out prompts"
    what += f" (the first {e.max_prompts})" if e.max_prompts else ""
    annotator = e.annotator or "none (outputs only, no win rate)"
    return f"pi_{t} on {what}, annotator {annotator}; gold agreement on the held-out pairs"


def format_plan(cfg: SPAConfig, rounds: list[Round]) -> str:
    """The plan as text for a terminal."""
    added = sum(r.t > cfg.iterations for r in rounds)
    count = f"{cfg.iterations} iteration(s)" + (f" + {added} from spa expand" if added else "")
    out = [f"run {cfg.run_dir}: pi_init {cfg.model.pi_init}, {count}, spa {code_version()}"]
    for r in rounds:
        out.append("")
        out.append("seed (t = 0)" if r.t == 0 else f"iteration {r.t}")
        width = max(len(w) for w, _ in r.lines)
        out += [f"  {w.ljust(width)}  {text}" for w, text in r.lines]
        out.append("  " + "status".ljust(width) + "  " + ", ".join(f"{k} {s}" for k, s in r.stages.items()))
    return "\n".join(out)


def plan_as_dict(rounds: list[Round]) -> list[dict[str, Any]]:
    """The plan as JSON-ready rows (``spa plan --json``)."""
    return [{"t": r.t, "lines": dict(r.lines), "stages": r.stages} for r in rounds]
