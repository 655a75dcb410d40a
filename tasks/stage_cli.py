"""The per-stage commands of ``spa`` (prepare, unpaired, seed, sample, judge, train, train-rm, evaluate, report).

Each runs one stage over the run directory, for debugging and for the flow's stage processes
(``python -m spa_tasks.stage_cli <stage> ...``). This module never imports the flows, so the
Prefect tasks that start it do not import them back: ``spa_tasks.cli`` adds the flow commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(name="spa", help="The stages of an SPA run, one command each.", no_args_is_help=True,
                  add_completion=False)


# every command takes the config either way: `spa prepare run.yaml` or `spa prepare -c run.yaml`
ConfigArg = typer.Argument(None, exists=True, dir_okay=False, show_default=False,
                           help="YAML config of the run (or give it with -c)")
ConfigOpt = typer.Option(None, "--config", "-c", exists=True, dir_okay=False, help="YAML config of the run")
IterOpt = typer.Option(..., "--iteration", "-t", min=1, help="iteration t (1..T)")
ForceOpt = typer.Option(False, "--force", help="rerun even if the manifest says the stage is up to date")
ShardOpt = typer.Option(None, "--shard", help="do only chunk-aligned shard i of N: --shard i/N")
MergeOpt = typer.Option(None, "--merge", min=1, help="merge N finished shards into the stage's artifact")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value: -s train.beta=0.05 (repeatable)")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="also show library output (and, for spa run, Prefect's log) on "
                                                         "the terminal (it always goes to <run_dir>/logs/spa.log)")


def which_config(positional: Path | None, option: Path | None) -> Path:
    """The config given as the argument or with ``-c`` (exactly one of them)."""
    if positional is not None and option is not None and positional != option:
        raise typer.BadParameter(f"two configs given ({positional} and -c {option}): give one")
    config = positional if positional is not None else option
    if config is None:
        raise typer.BadParameter("give the run's YAML config: spa <command> run.yaml (or -c run.yaml)")
    return config


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """``--set key=value`` items as ``{key: value}`` (values parsed as YAML)."""
    import yaml

    parsed = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def load_with_overrides(config: Path, overrides: list[str] | None):
    """The config with ``--set key=value`` overrides applied."""
    from spa.config import load_config

    return load_config(config, parse_overrides(overrides))


def _output_session(cfg, verbose: bool):
    """A stage run by hand tells its story as ``spa run`` does: its own lines and errors on the terminal, library
    output (weight loading, trainer dicts, warnings) into ``<run_dir>/logs/spa.log`` (``-v`` shows it too). Under
    a flow (a stage process, or a stage in the flow's process) the flow has routed the output already."""
    import contextlib
    import os

    from spa.run import console

    if os.environ.get(console.FLOW_STAGE_ENV) or console.in_session():
        return contextlib.nullcontext()
    return console.terminal_session(cfg.run_dir, verbose)


def _run(fn, config: Path, overrides: list[str] | None, *args, verbose: bool = False, **kwargs) -> None:
    """Load the config, run a stage, and turn bad input into one clear line and exit code 2."""
    from spa.errors import BadInput

    try:
        cfg = load_with_overrides(config, overrides)
    except BadInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    with _output_session(cfg, verbose):
        try:
            fn(cfg, *args, **kwargs, echo=typer.echo)
        except BadInput as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None


@app.command()
def prepare(config_file: Path = ConfigArg, config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt,
            verbose: bool = VerboseOpt) -> None:
    """Split preference data into seed pairs, disjoint prompt sets and held-out gold pairs."""
    from spa.stages import prepare as stage

    _run(stage.run, which_config(config_file, config), overrides, force=force, verbose=verbose)


@app.command()
def unpaired(config_file: Path = ConfigArg, config: Path = ConfigOpt, force: bool = ForceOpt,
             overrides: list[str] = SetOpt, verbose: bool = VerboseOpt) -> None:
    """SSPO with data.unpaired_source: pi_init: one pi_init sample per prompt of X_1..X_T -> <run>/data/unpaired.parquet
    (spa seed runs it first when needed)."""
    from spa.stages import unpaired as stage

    _run(stage.run, which_config(config_file, config), overrides, force=force, verbose=verbose)


@app.command()
def seed(config_file: Path = ConfigArg, config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt,
            verbose: bool = VerboseOpt) -> None:
    """DPO of pi_init on the seed pairs -> iter_0/model (3 epochs by default; SSPO and DPO+SFT: with the
    unpaired set)."""
    from spa.stages import train as stage

    _run(stage.run, which_config(config_file, config), overrides, 0, force=force, verbose=verbose)


@app.command()
def sample(config_file: Path = ConfigArg, config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
           overrides: list[str] = SetOpt, shard: str = ShardOpt, merge: int = MergeOpt,
           verbose: bool = VerboseOpt) -> None:
    """Sample n responses per prompt of X_t from pi_{t-1} -> iter_t/responses.parquet."""
    from spa.stages import sample as stage

    _run(stage.run, which_config(config_file, config), overrides, iteration, force=force, shard=shard, merge=merge, verbose=verbose)


@app.command()
def judge(config_file: Path = ConfigArg, config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
           overrides: list[str] = SetOpt, shard: str = ShardOpt, merge: int = MergeOpt,
           verbose: bool = VerboseOpt) -> None:
    """Label response pairs (implicit reward Eq. 7-8, or the configured judge variant) -> iter_t/judgments.parquet."""
    from spa.stages import judge as stage

    _run(stage.run, which_config(config_file, config), overrides, iteration, force=force, shard=shard, merge=merge, verbose=verbose)


@app.command()
def train(config_file: Path = ConfigArg, config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
          overrides: list[str] = SetOpt,
            verbose: bool = VerboseOpt) -> None:
    """Refined DPO (Eq. 9-12) from pi_{t-1} on the judged pairs -> iter_t/model, train_log.parquet."""
    from spa.stages import train as stage

    _run(stage.run, which_config(config_file, config), overrides, iteration, force=force, verbose=verbose)


@app.command("train-rm")
def train_rm(config_file: Path = ConfigArg, config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt,
             epochs: int = typer.Option(None, min=1, help="passes over the seed pairs (default: judge.rm_epochs)"),
             lr: float = typer.Option(None, help="AdamW learning rate (default: judge.rm_learning_rate)"),
             verbose: bool = VerboseOpt) -> None:
    """Train a Bradley-Terry reward model on the seed pairs -> judge.reward_model (judge.type external_rm)."""
    from spa.stages import train_rm as stage

    _run(stage.run, which_config(config_file, config), overrides, force=force, epochs=epochs, lr=lr, verbose=verbose)


@app.command()
def evaluate(config_file: Path = ConfigArg, config: Path = ConfigOpt,
             iteration: int = typer.Option(..., "--iteration", "-t", min=0, help="0 evaluates pi_0"),
             force: bool = ForceOpt, overrides: list[str] = SetOpt,
            verbose: bool = VerboseOpt) -> None:
    """Answer the eval set with pi_t, score it (win rate, LC win rate, MT-Bench), gold agreement -> iter_t/eval.*"""
    from spa.stages import evaluate as stage

    _run(stage.run, which_config(config_file, config), overrides, iteration, force=force, verbose=verbose)


@app.command()
def report(config_file: Path = ConfigArg, config: Path = ConfigOpt, overrides: list[str] = SetOpt,
            verbose: bool = VerboseOpt) -> None:
    """Write report.md with the per-iteration table."""
    from spa.stages import report as stage

    _run(stage.run, which_config(config_file, config), overrides, verbose=verbose)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
