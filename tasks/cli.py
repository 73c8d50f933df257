"""`lmforge`: one command for the stages, the pipeline and the registry operations."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer

from tasks.config import STAGE_SECTIONS, load_params
from tasks.errors import UserError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)

DVC_STAGES = [s for s in STAGE_SECTIONS if s != "promote"]


def _fail(e: UserError) -> None:
    typer.echo(f"lmforge: error: {e}", err=True)
    raise typer.Exit(2)


@app.command()
def stage(name: str = typer.Argument(..., help=f"one of: {', '.join(DVC_STAGES)}"), params: str = "params.yaml") -> None:
    """Run one pipeline stage (what dvc.yaml calls)."""
    if name not in DVC_STAGES:
        _fail(UserError(f"unknown stage {name!r}; choose one of {DVC_STAGES}"))
    os.environ["LMFORGE_PARAMS"] = params
    sys.argv = [f"tasks.{name}"]
    importlib.import_module(f"tasks.{name}").main()


@app.command()
def pipeline(promote: bool = typer.Option(True, help="apply the gates and promote at the end")) -> None:
    """Run the whole Prefect flow (every stage through DVC, then promotion)."""
    from flows.pipeline import StageFailed
    from flows.pipeline import pipeline as flow

    try:
        flow(promote=promote)
    except UserError as e:
        _fail(e)
    except StageFailed as e:
        typer.echo(f"lmforge: pipeline stopped: {e}", err=True)
        raise typer.Exit(1)


@app.command()
def promote(params: str = "params.yaml") -> None:
    """Gate the evaluated candidate, register it and move @champion if every gate passes (exit 1 if not)."""
    from tasks.promote import run

    try:
        decision = run(load_params(params), params_file=params)
    except UserError as e:
        _fail(e)
    raise typer.Exit(0 if decision.promoted else 1)


@app.command()
def rollback(to: Optional[str] = typer.Option(None, help="version to point @champion at (default: the previous passing one)"), params: str = "params.yaml") -> None:
    """Move @champion back to an earlier registered version."""
    from tasks.promote import rollback as do_rollback

    try:
        do_rollback(load_params(params), to)
    except UserError as e:
        _fail(e)


@app.command()
def serve(port: int = 3000, host: str = "127.0.0.1") -> None:
    """Serve @champion with BentoML (`bentoml serve deploy.service:LMForge`)."""
    os.execvp("bentoml", ["bentoml", "serve", "deploy.service:LMForge", "--host", host, "--port", str(port)])


@app.command()
def ui(port: int = 5000, params: str = "params.yaml") -> None:
    """Open the MLflow UI on the project's tracking store."""
    from tasks.tracking import tracking_uri

    try:
        cfg = load_params(params).tracking
    except UserError as e:
        _fail(e)
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", tracking_uri(cfg), "--port", str(port)])


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument("train_throughput", help="a script in bench/")) -> None:
    """Run a benchmark from bench/; other options pass through (e.g. `--preset nanogpt-cpu`)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / f"{name.replace('-', '_')}.py"
    if not script.exists():
        _fail(UserError(f"{script}: no such benchmark"))
    os.execv(sys.executable, [sys.executable, str(script), *ctx.args])


if __name__ == "__main__":
    app()
