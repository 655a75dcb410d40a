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


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="directory to write the model into"),
    seed: int = typer.Option(0, help="initialisation seed"),
) -> None:
    """Build a tiny random Llama with a locally trained tokenizer and chat template (offline)."""
    from spa.tiny import build_tiny_model

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
