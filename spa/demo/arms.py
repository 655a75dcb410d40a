"""Comparison arms on the demo world: the same rounds with parts of SPA switched off, or under label noise.

An arm is a set of config overrides (dotted keys) applied to the demo config. Every arm starts
from a copy of a run whose ``prepare`` and seed stage are done (the manifest is relocatable),
so arms share ``pi_0`` and differ only in what they change; stages that an arm leaves
unchanged (iteration 1's sampling, say) are reused from the copy by the manifest's resume
keys, not redone. Stages run in this process through the same stage code as ``spa run``.
``spa demo`` and ``bench/demo_arms.py`` both use these.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spa.config import SPAConfig, parse_config
from spa.demo.metrics import run_metrics
from spa.stages import evaluate, judge, prepare, sample, train

NO_REFINE = {"train.refinement.self_refine": False, "train.refinement.decoupled": False}
# name: overrides. "spa" is the default config (SR + DND, the paper's alpha, K, window, lambdas).
ARMS: dict[str, dict[str, Any]] = {
    "iterative_dpo": NO_REFINE,
    "spa_sr": {"train.refinement.decoupled": False},
    "spa": {},
}


# Arms with a seed stage of their own (docs/variants.md 7), on the same gold seed, prompts and evaluation; each needs
# data.unpaired_source (the world's unpaired set, spa.demo.run.write_unpaired_source, unless the arm names its own).
# "sspo", "sspo_pi_init" and "dpo_sft" stop after the seed stage (their pi_0 is the arm's result); "sspo_then_spa"
# runs SPA's rounds from SSPO's pi_0. All keep the run's iterations in the config, so that prepare leaves the same
# prompts out of the unpaired set. "sspo_pi_init" trains on pi_init's own answers to those prompt batches instead
# (one sample per prompt, data.unpaired_source: pi_init): SSPO with no second source. "sspo_implicit_then_spa" is
# "sspo_then_spa" with train.sspo.reward: implicit.
SEED_ARMS: dict[str, dict[str, Any]] = {
    "sspo": {"train.loss": "sspo"},
    "dpo_sft": {"train.loss": "dpo+sft"},
    "sspo_then_spa": {"train.loss": "sspo"},
    "sspo_pi_init": {"train.loss": "sspo", "data.unpaired_source": "pi_init"},
    # SSPO on DPO's implicit reward against pi_init (the rounds' judge's reward), then SPA's rounds
    "sspo_implicit_then_spa": {"train.loss": "sspo", "train.sspo.reward": "implicit"},
    # SSPO's settings where the paper leaves a choice: the authors' code's threshold, and the curriculum's decay
    # at the ends of the paper's range (0.001-0.01; the default 0.005 ends the demo's 141 steps at g = 0.49)
    "sspo_min_chosen": {"train.loss": "sspo", "train.sspo.threshold": "min_chosen"},
    "sspo_decay001": {"train.loss": "sspo", "train.sspo.decay": 0.001},
    "sspo_decay01": {"train.loss": "sspo", "train.sspo.decay": 0.01},
    # decay 0 keeps the gold loss's weight g at 1: the unpaired term off, in the same steps and batches as SSPO
    "sspo_gold_only": {"train.loss": "sspo", "train.sspo.decay": 0.0},
}
SEED_ONLY = tuple(arm for arm in SEED_ARMS if not arm.endswith("_then_spa"))  # the seed stage only, no rounds


def quiet(_msg: str) -> None:
    pass


def merge(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of ``raw`` with dotted-key ``overrides`` (``{"judge.flip_fraction": 0.2}``) applied."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def run_iterations(cfg: SPAConfig, echo: Callable[[str], None] = quiet, evaluate_rounds: str = "every") -> SPAConfig:
    """Iterations 1..T of ``cfg`` (sample, judge, train, evaluate), each stage skipped when up to date;
    ``evaluate_rounds="last"`` evaluates only pi_T (where an evaluation costs more than a round's diagnostics say)."""
    for t in range(1, cfg.iterations + 1):
        sample.run(cfg, t, echo=echo)
        judge.run(cfg, t, echo=echo)
        train.run(cfg, t, echo=echo)
        if evaluate_rounds == "every" or t == cfg.iterations:
            evaluate.run(cfg, t, echo=echo)
    return cfg


def run_arm(base_run: Path, run_dir: Path, raw: dict, overrides: dict[str, Any],
            echo: Callable[[str], None] = quiet, resume: bool = False, evaluate_rounds: str = "every") -> list[dict[str, Any]]:
    """Copy ``base_run`` (seed stage done) to ``run_dir`` and run the iterations of ``raw`` + ``overrides``.

    ``resume=True`` keeps an earlier attempt's ``run_dir`` (one with a manifest) instead of copying afresh:
    its stages are skipped where the manifest says they are up to date (same inputs, stage config and code
    version), so a killed benchmark picks up where it stopped and a changed arm still reruns."""
    run_dir = Path(run_dir)
    kept = resume and (run_dir / "manifest.json").exists()
    if not kept and run_dir.resolve() != Path(base_run).resolve():
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(base_run, run_dir)
    cfg = parse_config(merge(raw, overrides) | {"run_dir": str(run_dir)})
    cfg = run_iterations(cfg, echo, evaluate_rounds)
    return run_metrics(cfg) if evaluate_rounds == "every" else []


def run_seed_arm(run_dir: Path, raw: dict, overrides: dict[str, Any], echo: Callable[[str], None] = quiet,
                 resume: bool = False, rounds: bool = True) -> list[dict[str, Any]]:
    """A run of ``raw`` + ``overrides`` from its own seed stage (an arm of ``SEED_ARMS``) in ``run_dir``, then its
    iterations (``rounds``); the seed stage's row carries the unpaired set's diagnostics (SSPO's pseudo-labels
    against the oracle). ``resume``: keep an earlier attempt's stages where they are up to date."""
    from spa.demo.metrics import unpaired_diagnostics

    run_dir = Path(run_dir)
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    cfg = run_seed_stage(merge(raw, overrides) | {"run_dir": str(run_dir)}, echo)
    if rounds:
        run_iterations(cfg, echo)
    rows = run_metrics(cfg)
    rows[0] |= unpaired_diagnostics(cfg)
    return rows


def run_sft(raw: dict, run_dir: Path, echo: Callable[[str], None] = quiet) -> dict[str, Any]:
    """pi_init itself (no-seed mode: pi_0 = pi_init) evaluated on the same prompts: the SFT row."""
    sft = merge(raw, {"model.pi_0": raw["model"]["pi_init"], "run_dir": str(run_dir)})
    cfg = parse_config(sft)
    prepare.run(cfg, echo=echo)
    evaluate.run(cfg, 0, echo=echo)
    return run_metrics(cfg)[0]


def run_seed_stage(raw: dict, echo: Callable[[str], None] = quiet) -> SPAConfig:
    """prepare + the seed stage + its evaluation (``pi_0``) in ``raw["run_dir"]``."""
    cfg = parse_config(raw)
    prepare.run(cfg, echo=echo)
    train.run(cfg, 0, echo=echo)
    evaluate.run(cfg, 0, echo=echo)
    return cfg


DEMO_FLIP = 0.2  # the injected label-noise rate of the demo's noise arms


def demo_comparison(raw: dict, out: Path, echo: Callable[[str], None] = quiet) -> dict[str, list[dict[str, Any]]]:
    """The arms ``spa demo`` reports beside its SPA run ``raw`` (finished): SFT, seed-only DPO (the run's
    ``pi_0``), iterative DPO without refinement, and both iterative arms under ``DEMO_FLIP`` injected flips.
    ``echo`` gets one line per arm (the stages' own lines stay quiet)."""
    main = Path(raw["run_dir"])
    out = Path(out)
    spa_rows = run_metrics(parse_config(raw))
    results: dict[str, list[dict[str, Any]]] = {"sft": [run_sft(raw, out / "sft")], "seed_dpo": spa_rows[:1]}
    jobs = {"iterative_dpo": ARMS["iterative_dpo"]}
    jobs |= {f"{name}_flip": {**ARMS[name], "judge.flip_fraction": DEMO_FLIP} for name in ("iterative_dpo", "spa")}
    for name, overrides in jobs.items():
        results[name] = run_arm(main, out / name, raw, overrides)
        echo(f"[demo] arm {name}: win rate " + " -> ".join(f"{r['win_rate']:.1f}" for r in results[name]))
    results["spa"] = spa_rows
    order = ("sft", "seed_dpo", "iterative_dpo", "spa", "iterative_dpo_flip", "spa_flip")
    return {name: results[name] for name in order}
