"""`lmforge`: one command for the stages, the pipeline and the registry operations."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from deploy.runtime import WORKERS_ENV, serving_env
from tasks.ops.dag import load_dvc_yaml, stage_module, stage_names
from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError
from tasks.shared.stagerun import INTERRUPTED_EXIT, USER_ERROR_EXIT

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def _fail(e: UserError) -> None:
    typer.echo(f"lmforge: error: {e}", err=True)
    raise typer.Exit(USER_ERROR_EXIT)


@app.command()
def stage(
    name: str = typer.Argument(..., help="a stage of dvc.yaml (ingest, clean, ..., evaluate)"),
    params: str = "params.yaml",
) -> None:
    """Run one pipeline stage (what dvc.yaml calls), after checking all of params.yaml as `lmforge check` does."""
    try:
        names = stage_names(Path.cwd())
    except UserError as e:
        _fail(e)
    if name not in names:
        _fail(UserError(f"unknown stage {name!r}; dvc.yaml has {names}"))
    os.environ["LMFORGE_PARAMS"] = params
    module = stage_module(name, load_dvc_yaml(Path.cwd())["stages"][name])  # tasks.<stage> or tasks.<task>.<stage>
    sys.argv = [module]
    importlib.import_module(module).main()


@app.command()
def pipeline(
    promote: bool = typer.Option(True, help="apply the gates and promote at the end"),
    lock_timeout: float = typer.Option(3600.0, help="seconds to wait while another run holds this workspace"),
) -> None:
    """Run the whole Prefect flow (every stage through DVC, then promotion); Ctrl-C stops it and its stage."""
    from tasks.ops import supervise

    try:
        load_params()  # one line for a bad params.yaml, before Prefect starts
    except UserError as e:
        _fail(e)
    cmd = [sys.executable, "-m", "flows.pipeline", "--lock-timeout", str(lock_timeout)] + (
        [] if promote else ["--no-promote"]
    )
    raise typer.Exit(supervise.run(cmd))


@app.command()
def retrain(
    force: bool = typer.Option(False, "--force", help="run even when data, code and params equal @champion's lineage"),
    promote: bool = typer.Option(True, help="apply the gates and promote at the end"),
    lock_timeout: float = typer.Option(3600.0, help="seconds to wait while another run holds this workspace"),
) -> None:
    """Retrain now, on this machine: skip in seconds if nothing changed since @champion, else run the pipeline
    and promote."""
    from tasks.ops import supervise

    try:
        load_params()
    except UserError as e:
        _fail(e)
    cmd = (
        [sys.executable, "-m", "flows.retrain", "--lock-timeout", str(lock_timeout)]
        + (["--force"] if force else [])
        + ([] if promote else ["--no-promote"])
    )
    raise typer.Exit(supervise.run(cmd))


@app.command()
def schedule(
    cron: Optional[str] = typer.Option(None, help="override the cron of the `retrain` deployment in prefect.yaml"),
    timezone: Optional[str] = typer.Option(None, help="override its timezone"),
    port: int = typer.Option(4200, help="port of the local Prefect server started when PREFECT_API_URL is not set"),
) -> None:
    """Serve the retrain schedule on this machine until stopped (`flow.serve`), starting a local Prefect server
    if none is set."""
    from tasks.ops import supervise
    from tasks.ops.schedule import check_schedule
    from tasks.ops.servers import local_prefect_server

    try:
        load_params()
        check_schedule(cron, timezone)
        with local_prefect_server(port) as url:
            cmd = (
                [sys.executable, "-m", "flows.retrain", "--serve"]
                + (["--cron", cron] if cron else [])
                + (["--timezone", timezone] if timezone else [])
            )
            code = supervise.run(cmd, env={**os.environ, "PREFECT_API_URL": url})
    except UserError as e:
        _fail(e)
    raise typer.Exit(0 if code in (0, INTERRUPTED_EXIT) else code)


POOLS = ("cpu", "gpu")


def _prefect_server() -> str:
    """The Prefect server deployments and workers talk to; a temporary one would vanish with this command."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError(
            "deployments and workers need a Prefect server: start one (`prefect server start`, "
            "or deploy/stack/stack.sh up) and set PREFECT_API_URL"
        )
    return url


@app.command()
def deploy() -> None:
    """Create the `cpu` and `gpu` process work pools and apply prefect.yaml's deployments on the Prefect server."""
    import subprocess

    try:
        url = _prefect_server()
    except UserError as e:
        _fail(e)
    prefect = [sys.executable, "-m", "prefect"]
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_WORKDIR"}  # resolved on each worker, not here
    for pool in POOLS:
        res = subprocess.run([*prefect, "work-pool", "inspect", pool], capture_output=True, text=True, env=env)
        if res.returncode == 0:
            typer.echo(f"work pool {pool!r} exists on {url}")
            continue
        res = subprocess.run(
            [*prefect, "work-pool", "create", pool, "--type", "process"], capture_output=True, text=True, env=env
        )
        if res.returncode != 0:
            _fail(
                UserError(
                    f"prefect work-pool create {pool} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}"
                )
            )
        typer.echo(f"work pool {pool!r} created on {url}")
    res = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        _fail(UserError(f"prefect deploy --all failed: {(res.stdout + res.stderr).strip().splitlines()[-1:]}"))
    typer.echo(
        "deployments applied from prefect.yaml: lmforge-retrain/retrain (pool cpu), lmforge-stage/gpu (pool gpu)"
    )


@app.command()
def worker(
    pool: str = typer.Option(..., help="work pool to serve: cpu or gpu"),
    name: Optional[str] = typer.Option(None, help="worker name (default: Prefect's)"),
) -> None:
    """Start a Prefect process worker for `pool` that runs flows in this working copy (`prefect worker start`)."""
    try:
        _prefect_server()
        if pool not in POOLS:
            raise UserError(f"unknown pool {pool!r}; lmforge's pools are {', '.join(POOLS)}")
        load_params()
    except UserError as e:
        _fail(e)
    os.environ["LMFORGE_WORKDIR"] = str(Path.cwd().resolve())  # prefect.yaml's pull step runs flows here
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        pool,
        "--type",
        "process",
        "--install-policy",
        "never",
    ]
    os.execv(sys.executable, cmd + (["--name", name] if name else []))


def _registry_errors(e: Exception) -> UserError:
    """An MLflow failure (unreachable server, bad store) as one line instead of a traceback."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return UserError(f"MLflow registry: {str(e.message if hasattr(e, 'message') else e).splitlines()[0]}")
    raise e


def _stores_settled(what: str):
    """For a command that opens the MLflow store or BentoML's beside runs: once no run of this workspace is creating
    them (tasks/ops/lock.py: waiting is one line), holding the workspace lock for the duration if no run holds it."""
    from tasks.ops.lock import stores_settled

    return stores_settled(Path.cwd(), what)


TASK_HELP = "the task whose registered model to act on (classification, kg, align)"


def _require_task(task: str) -> str:
    from tasks.shared.tasks import TASKS

    if task not in TASKS:
        raise UserError(f"--task: unknown task {task!r}; tasks are {sorted(TASKS)}")
    return task


@app.command()
def promote(
    params: str = "params.yaml",
    task: Optional[str] = typer.Option(
        None, help="only this task (classification, kg, align); default: every task in tasks.enabled, in order"
    ),
    lock_timeout: float = typer.Option(3600.0, help="seconds to wait while a pipeline holds this workspace"),
    force: bool = typer.Option(
        False, "--force", help="move @champion even if gates fail (needs --reason; recorded as an override)"
    ),
    reason: Optional[str] = typer.Option(
        None, help="why: recorded in the alias history (and on the version when forced)"
    ),
) -> None:
    """Gate each task's evaluated candidate, register it as @candidate and move its @champion if every gate passes
    (exit 1 if one is not promoted).

    Refuses (exit 2) unless DVC reports the task's stages up to date and the artifacts match what was scored.
    With --force --reason "…" a candidate that fails gates becomes @champion anyway, recorded as an override."""
    from tasks.ops.lock import workspace_lock
    from tasks.ops.registry import override_reason
    from tasks.shared.tasks import TASKS, promotion

    try:
        override_reason(force, reason)  # before waiting for the workspace
        cfg = load_params(params)
        names = [_require_task(task)] if task else list(cfg.tasks.enabled)
        promoted = []
        with workspace_lock(Path.cwd(), "lmforge promote", lock_timeout):
            for name in names:
                promoted.append(promotion(TASKS[name])(cfg, params_file=params, force=force, reason=reason).promoted)
    except UserError as e:
        _fail(e)
    except Exception as e:
        _fail(_registry_errors(e))
    raise typer.Exit(0 if all(promoted) else 1)


@app.command()
def rollback(
    to: Optional[str] = typer.Option(None, help="version to point @champion at (default: the previous passing one)"),
    force: bool = typer.Option(
        False, "--force", help="allow a version that failed its gates (needs --reason; recorded)"
    ),
    reason: Optional[str] = typer.Option(None, help="why: recorded in the alias history"),
    task: str = typer.Option("classification", help=TASK_HELP),
    params: str = "params.yaml",
) -> None:
    """Move @champion back to an earlier registered version that passed its gates (or --force one that did not)."""
    from tasks.ops.rollback import run

    try:
        _require_task(task)
        with _stores_settled("lmforge rollback"):
            run(load_params(params), to, force=force, reason=reason, task=task)
    except UserError as e:
        _fail(e)
    except Exception as e:
        _fail(_registry_errors(e))


@app.command()
def verify(
    version: str = typer.Argument(..., help="a registered version of tracking.registered_model (e.g. 1)"),
    params: str = "params.yaml",
) -> None:
    """Rebuild a registered version from its lineage in a temporary git worktree (commit, params, inputs, the
    recorded precisions) and compare every file it would register: exit 0 when all are identical, 1 if not."""
    from tasks.ops.verify import run

    try:
        verdict = run(load_params(params), version.removeprefix("v"))
    except KeyboardInterrupt:
        typer.echo("lmforge verify: interrupted; the temporary worktree was removed", err=True)
        raise typer.Exit(INTERRUPTED_EXIT) from None
    except UserError as e:
        _fail(e)
    except Exception as e:
        _fail(_registry_errors(e))
    name, took = load_params(params).tracking.registered_model, f"{verdict.seconds:.0f} s"
    if verdict.reproduced:
        typer.echo(f"reproduced {name} v{version.removeprefix('v')}: {verdict.compared} artifacts identical ({took})")
        return
    typer.echo(
        f"not reproduced {name} v{version.removeprefix('v')}: {verdict.first_file}: {verdict.detail}; "
        f"first differing stage: {verdict.first_stage or 'none (every cached stage output is identical)'} ({took})"
    )
    raise typer.Exit(1)


@app.command()
def history(task: str = typer.Option("classification", help=TASK_HELP), params: str = "params.yaml") -> None:
    """Every move of @champion and @candidate: when, which alias, from which version to which, who, why, and
    whether gates were overridden."""
    from mlflow import MlflowClient
    from tasks.ops.registry import alias_history
    from tasks.shared.tasks import TASKS, registered_name
    from tasks.shared.tracking import setup_tracking

    try:
        _require_task(task)
        cfg = load_params(params).tracking
        with _stores_settled("lmforge history"):
            setup_tracking(cfg)
            events = alias_history(MlflowClient(), registered_name(TASKS[task], cfg))
    except UserError as e:
        _fail(e)
    except Exception as e:
        _fail(_registry_errors(e))
    if not events:
        typer.echo("no moves of @champion or @candidate recorded yet")
    for ev in events:
        override = "  OVERRIDE" if ev.get("override") else ""
        typer.echo(
            f"{ev['time']}  {ev['alias']:<9}  v{ev.get('from') or '-'} -> v{ev['to']}  "
            f"{ev.get('user', '')}: {ev['reason']}{override}"
        )


@app.command()
def export(
    version: str = typer.Argument(
        ..., help="a registered version (3 or v3), an alias (champion), or a local bundle or classifier folder"
    ),
    fmt: str = typer.Option(..., "--format", help="hf (Hugging Face GPT-2 folders) or onnx (ONNX Runtime graphs)"),
    out: Path = typer.Option(..., "--out", help="a new or empty folder to write"),
    params: str = "params.yaml",
) -> None:
    """Write a model in a format other tools load: `hf` for transformers, `onnx` for ONNX Runtime (see
    tasks/ops/export.py for what each holds and what has no GPT-2 form)."""
    from tasks.ops.export import run

    try:
        with _stores_settled("lmforge export"):
            files = run(version, fmt, out, load_params(params))
    except UserError as e:
        _fail(e)
    except Exception as e:
        _fail(_registry_errors(e))
    typer.echo(f"exported {version} as {fmt} to {out}: {len(files)} files")
    for f in files:
        typer.echo(f"  {f.as_posix()}")


@app.command()
def serve(
    port: Optional[int] = typer.Option(None, help="port (default: 3000; 50051 with --grpc)"),
    host: str = "127.0.0.1",
    grpc: bool = typer.Option(
        False,
        "--grpc",
        help="serve gRPC (`python -m deploy.grpc_server`, contract deploy/lmforge.proto) instead of REST",
    ),
    metrics_port: int = typer.Option(
        0, help="with --grpc: Prometheus metrics on this port (deploy/metrics.py; 0: off; REST has /metrics)"
    ),
    workers: Optional[int] = typer.Option(
        None, min=1, help="server processes (default: LMFORGE_WORKERS, else 1): BentoML workers, or gRPC's --workers"
    ),
) -> None:
    """Serve @champion with BentoML (`bentoml serve deploy.service:LMForge`), or over gRPC with --grpc, after
    loading it into BentoML's model store."""
    typer.echo(f"serving {_preflight()}", err=True)
    env = serving_env(os.environ)  # set before the server loads torch (deploy/runtime.py says why)
    if workers is not None:  # both servers read it (REST's BentoML workers; gRPC's --workers default)
        env[WORKERS_ENV] = str(workers)
    if grpc:
        os.execve(
            sys.executable,
            [sys.executable, "-m", "deploy.grpc_server", "--host", host]
            + ([] if port is None else ["--port", str(port)])
            + (["--metrics-port", str(metrics_port)] if metrics_port else []),
            env,
        )
    os.execve(
        _bentoml(),
        ["bentoml", "serve", "deploy.service:LMForge", "--host", host, "--port", str(3000 if port is None else port)],
        env,
    )


def _bentoml() -> str:
    """BentoML's command beside this Python (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "bentoml"
    return str(beside) if beside.exists() else "bentoml"


def _preflight() -> str:
    """Load the model the servers will serve (a registry version lands in BentoML's model store); one line
    describing it."""
    from deploy.core import describe
    from deploy.resolve import ModelUnavailable, open_model

    try:
        with _stores_settled("lmforge serve (loading the model)"):
            return describe(open_model())
    except (UserError, ModelUnavailable) as e:
        _fail(UserError(str(e)))


@app.command()
def build() -> None:
    """Build a Bento of @champion (`bentoml build -f deploy/bentofile.yaml`): the model goes inside, so it serves
    with no tracking store."""
    import subprocess

    from deploy.resolve import IN_BENTO

    if IN_BENTO:
        _fail(UserError("lmforge build runs in the project, not inside a Bento"))
    typer.echo(f"packing {_preflight()}", err=True)
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([_bentoml(), "build", "-f", str(root / "deploy" / "bentofile.yaml"), str(root)], cwd=root)
    if res.returncode != 0:
        _fail(UserError(f"bentoml build exited with code {res.returncode}"))


@app.command()
def ui(
    prefect: bool = typer.Option(
        False,
        "--prefect",
        help="Prefect's UI on the flow and task runs in PREFECT_HOME (.prefect/) instead of MLflow's",
    ),
    port: Optional[int] = typer.Option(None, help="port of a UI started here (default: MLflow 5000, Prefect 4200)"),
    params: str = "params.yaml",
) -> None:
    """Open the MLflow UI on the project's tracking store, or with --prefect the Prefect UI on every recorded run.

    A tracking server in MLFLOW_TRACKING_URI (or tracking.uri) and a Prefect server in PREFECT_API_URL are used as
    they are: their URL is printed, nothing is started. Otherwise the UI runs here until Ctrl-C."""
    try:
        if prefect:
            _prefect_ui(4200 if port is None else port)
            return
        _mlflow_ui(load_params(params).tracking, 5000 if port is None else port)
    except UserError as e:
        _fail(e)


def _mlflow_ui(cfg, port: int) -> None:
    """`mlflow ui` on the embedded store (created first, under the workspace lock, if no run has made it yet), or
    the URL of the tracking server the project uses."""
    from tasks.ops.servers import healthy
    from tasks.shared.tracking import tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        if not healthy(uri, timeout=10):
            raise UserError(f"the MLflow tracking server {uri} does not answer (MLFLOW_TRACKING_URI or tracking.uri)")
        typer.echo(f"MLflow UI: {uri} (the project's tracking server; none started)")
        return
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():  # `mlflow ui` would create it: not beside a first run creating it too
        with _stores_settled("lmforge ui (creating the MLflow store)") as locked:
            if locked:
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    typer.echo(f"MLflow UI: http://127.0.0.1:{port} (store {uri}); Ctrl-C stops it")
    os.execvp("mlflow", ["mlflow", "ui", "--backend-store-uri", uri, "--port", str(port)])


def _prefect_ui(port: int) -> None:
    """The URL of the Prefect server in PREFECT_API_URL, or `prefect server start` on PREFECT_HOME's database until
    Ctrl-C or SIGTERM (which stop it and its children)."""
    from prefect.settings import PREFECT_API_URL

    from tasks.ops.servers import healthy, local_prefect_server, serve_until_stopped, ui_url
    from tasks.shared import lifeline

    api = PREFECT_API_URL.value()
    if api:
        if not healthy(api, timeout=10):
            raise UserError(f"the Prefect server in PREFECT_API_URL ({api}) does not answer")
        typer.echo(f"Prefect UI: {ui_url(api)} (the server in PREFECT_API_URL; none started)")
        return
    lifeline.interrupt_on_sigterm()
    try:
        with local_prefect_server(port) as api:
            typer.echo(f"Prefect UI: {ui_url(api)} (every flow and task run recorded here); Ctrl-C stops it")
            serve_until_stopped(api)
    except KeyboardInterrupt:
        typer.echo("lmforge ui: Prefect server stopped", err=True)


@app.command()
def metrics(stages: Optional[list[str]] = typer.Argument(None, help="stages to show (default: all)")) -> None:
    """Each stage's metrics one per line: `dvc metrics show`, transposed so it stays readable."""
    import json
    import subprocess

    from tasks.ops.dag import dvc_command
    from tasks.shared.tracking import flatten

    targets = [f"{load_params().paths.metrics}/{s}.json" for s in stages or []]
    res = subprocess.run(dvc_command("metrics", "show", "--json", *targets), capture_output=True, text=True)
    if res.returncode != 0:
        _fail(UserError(f"dvc metrics show failed: {res.stderr.strip() or res.stdout.strip()}"))
    files = next(iter(json.loads(res.stdout or "{}").values()), {}).get("data", {})
    rows = [(path, key, value) for path, body in files.items() for key, value in flatten(body.get("data", {})).items()]
    if not rows:
        _fail(UserError("no metrics yet (run the pipeline: `make pipeline` or `dvc repro`)"))
    width = [max(len(str(r[i])) for r in rows) for i in range(2)]
    typer.echo(f"{'Path':<{width[0]}}  {'Metric':<{width[1]}}  Value")
    for path, key, value in rows:
        typer.echo(f"{path:<{width[0]}}  {key:<{width[1]}}  {value}")


@app.command("check")
def check(params: str = "params.yaml") -> None:
    """Validate all of params.yaml (values, unknown sections and keys, keys written twice, ingest inputs outside
    paths.user_data), and check dvc.yaml's deps and params against the code (no training)."""
    from tasks.ops.dag import check_deps

    try:
        load_params(params)
        problems = check_deps(Path.cwd())
    except UserError as e:
        _fail(e)
    for line in problems:
        typer.echo(line, err=True)
    if problems:
        typer.echo("lmforge: dvc.yaml disagrees with the code; `lmforge deps --write` rewrites its deps", err=True)
        raise typer.Exit(1)
    typer.echo(f"{params} valid; dvc.yaml deps and params match the code")


@app.command("deps")
def deps(
    write: bool = typer.Option(False, "--write", help="rewrite dvc.yaml's code deps and params from the code"),
) -> None:
    """Show (or --write) each stage's code deps: its import closure, and the params sections it reads."""
    from tasks.ops.dag import expected, write_deps

    try:
        if write:
            typer.echo("dvc.yaml updated" if write_deps(Path.cwd()) else "dvc.yaml already matches the code")
            return
        stages = expected(Path.cwd())
    except UserError as e:
        _fail(e)
    for s in stages:
        typer.echo(f"{s.stage}: params {s.sections}")
        for f in s.code:
            typer.echo(f"    {f}")


@app.command("check-lock")
def check_lock() -> None:
    """Name every code or params dependency whose hash in dvc.lock differs from the working tree (exit 1 if any)."""
    from tasks.ops.dag import stale_lock

    try:
        problems = stale_lock(Path.cwd())
    except UserError as e:
        _fail(e)
    for line in problems:
        typer.echo(line)
    if problems:
        typer.echo(
            f"lmforge: dvc.lock is stale ({len(problems)} entries); `make pipeline` (or `dvc repro`) refreshes it",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo("dvc.lock matches the code and params in the working tree")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context, name: str = typer.Argument("train_throughput", help="a script in bench/")) -> None:
    """Run a benchmark from bench/; other options pass through (e.g. `--preset nanogpt-cpu`)."""
    script = Path(__file__).resolve().parents[2] / "bench" / f"{name.replace('-', '_')}.py"
    if not script.exists():
        _fail(UserError(f"{script}: no such benchmark"))
    os.execv(sys.executable, [sys.executable, str(script), *ctx.args])


if __name__ == "__main__":
    app()
