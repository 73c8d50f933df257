"""The lmforge pipeline as a Prefect flow.

Each stage runs through DVC (`dvc repro --single-item <stage>`), so DVC alone decides what is stale
and dvc.lock stays current whichever driver ran. The flow adds one MLflow parent run (stages open
nested runs under it), the workspace lock (one run per workspace: DVC holds a repo lock; see
tasks/ops/lock.py), the promotion decision and two Prefect artifacts: `lmforge-evaluation` (markdown: the
test-split table, the gates, each stage's cost) and `lmforge-run` (a table: each stage's state and seconds in
this run, each gate's verdict), made when the run finishes or fails (not when it is interrupted). Every run
(`lmforge pipeline`, `lmforge retrain`, a deployment or a schedule) is tagged `commit:<git commit>`,
`params:<sha256 of params.yaml>` and `placement:<where stages run>`: the Prefect UI (`lmforge ui --prefect`)
filters runs by them.

Every stage runs in a process group of its own that the flow stops (SIGTERM, then SIGKILL) when it
is interrupted; if the flow process is killed outright, the stage notices its supervisor is gone
and stops itself (tasks/shared/lifeline.py). A user error (bad params or data: the stage's exit code
2) ends the flow in a Failed state carrying the stage's one-line message, without a traceback.

`python -m flows.pipeline` is what `lmforge pipeline` runs, in a session of its own so that Ctrl-C
reaches Prefect's temporary server only after the flow has recorded how the run ended. It takes the
workspace lock before Prefect's temporary server or the MLflow store start: both create or migrate shared
databases on first use (tasks/ops/lock.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows.placement import dvc_transfer, io_options, placement_tag, run_placed
from flows.stages import exit_code, run_stage, user_error, worth_retrying
from models.files import file_sha256
from tasks.ops.dag import dvc_command, stage_names
from tasks.ops.lock import DEFAULT_TIMEOUT, mark_stores_ready, workspace_lock
from tasks.shared import lifeline
from tasks.shared.config.base import DEFAULT_PARAMS
from tasks.shared.config.params import load_params
from tasks.shared.cost import cost_markdown
from tasks.shared.datasets import dvc_file, untracked_inputs
from tasks.shared.errors import UserError
from tasks.shared.io import expand_inputs, user_inputs
from tasks.shared.stagerun import INTERRUPTED_EXIT, RESUMABLE, USER_ERROR_EXIT, error_line, stage_env
from tasks.shared.tasks import TASKS, promotion, registered_name, selected_stages
from tasks.shared.tracking import PARENT_RUN_ENV, git_commit, setup_tracking, tracking_uri


@task(retries=0, task_run_name="promote {task_name}")
def promote_candidate(parent_run_id: str, task_name: str = "classification") -> dict | str:
    """Apply task `task_name`'s promotion gates and move its `champion` only if all pass; a refusal is its
    one-line reason."""
    task = TASKS[task_name]
    promote_run = promotion(task)
    os.environ[PARENT_RUN_ENV] = parent_run_id
    params = load_params()
    try:
        decision = promote_run(params, flow_run_id=str(flow_run.id or ""))
    except UserError as e:
        return error_line(f"promote {task_name}" if task_name != "classification" else "promote", e)
    return {
        "task": task_name,
        "registered_model": registered_name(task, params.tracking),
        "variant": decision.variant,
        "version": decision.version,
        "promoted": decision.promoted,
        "gates": [{"gate": g.name, "status": g.status, "passed": g.passed, "reason": g.reason} for g in decision.gates],
        "choice": decision.choice,
    }


def _status(gate: dict) -> str:
    """PASS, FAIL or `not configured` (a switched-off gate, which does not block)."""
    status = gate.get("status") or ("pass" if gate["passed"] else "fail")
    return status.upper() if status in ("pass", "fail") else status


def _with_ci(m: dict, key: str) -> str:
    """`0.7079 [0.6679, 0.7250]`: a score with its 95% interval (the score alone from an older evaluate)."""
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def summary_markdown(
    evaluation: dict | None,
    decision: dict | None,
    costs: dict[str, dict | None] | None = None,
    others: dict[str, tuple[dict | None, dict | None]] | None = None,
) -> str:
    """The run's artifact: the test-split table and the promotion's gates (classification's `evaluation` and
    `decision`), each other task's scores and promotion (`others`: task -> (its metrics, its decision)) and, given
    `costs`, each stage's cost."""
    text = ""
    if evaluation:
        rows = [
            "| model | accuracy [95% CI] | macro-F1 [95% CI] | p50 ms (1 text) | p50 ms (32 texts) | size (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for name, m in {**evaluation.get("variants", {}), **evaluation.get("baselines", {})}.items():
            rows.append(
                f"| {name} | {_with_ci(m, 'accuracy')} | {_with_ci(m, 'macro_f1')} | {m.get('p50_ms_b1', '')} | "
                f"{m.get('p50_ms_b32', '')} | {m.get('size_mb', '')} |"
            )
        text += "## Test-split evaluation\n\n" + "\n".join(rows)
    text += _promotion_markdown(decision)
    for task_name, (metrics, task_decision) in (others or {}).items():
        if metrics:
            text += f"\n\n## Task {task_name}: test-split scores\n\n" + _scores_markdown(metrics)
        text += _promotion_markdown(task_decision)
    if costs:
        text += "\n## Cost of each stage\n\n" + cost_markdown(costs)
    return text


def _promotion_markdown(decision: dict | None) -> str:
    if not decision:
        return ""
    verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
    gates = "\n".join(f"- {_status(g)} **{g['gate']}**: {g['reason']}" for g in decision["gates"])
    model = decision.get("registered_model", "")
    text = f"\n\n## Promotion: {model} {decision['variant']} v{decision['version']} {verdict}\n\n{gates}\n"
    if len(decision.get("choice") or {}) > 1:
        text += "\n### Why this variant\n\n" + "\n".join(f"- **{v}**: {why}" for v, why in decision["choice"].items())
        text += "\n"
    return text


def _scores_markdown(metrics: dict) -> str:
    """Every score of a task's metrics that carries a 95% interval, beside its baseline's where there is one."""
    rows = ["| score | model [95% CI] | baseline [95% CI] |", "|---|---|---|"]
    for key in [k for k in metrics if f"{k}_ci95" in metrics and not k.endswith("_baseline")]:
        if metrics[key] is None:
            continue
        base = f"{key}_baseline"
        shown = _with_ci(metrics, base) if metrics.get(base) is not None else ""
        rows.append(f"| {key} | {_with_ci(metrics, key)} | {shown} |")
    return "\n".join(rows)


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(promote: bool = True, lock_timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Run every stage of the project in the working directory through DVC inside one MLflow
    parent run, then gate and promote. Ends Failed (with the one-line reason) on a user error."""
    try:
        with workspace_lock(Path.cwd(), f"lmforge pipeline (Prefect flow run {flow_run.name or '?'})", lock_timeout):
            return run_stages(prepare(), promote)
    except UserError as e:
        return user_error(str(e))


def prepare():
    """All of params.yaml validated and the tracking store reachable, before anything runs; returns the params.

    Call it in a flow run under the workspace lock: the MLflow store is created on first use here, and Prefect's
    database exists once the flow runs, so it then tells `lmforge ui` waiters that both are ready."""
    params = load_params()
    require_tracking(params.tracking)
    setup_tracking(params.tracking)
    mark_stores_ready(Path.cwd())
    tag_flow_run(params)
    return params


def tag_flow_run(params) -> None:
    """Add `run_tags` to this flow run, however it was started (here, by a deployment or a schedule). Not through
    Prefect's `tags` context: its task runs would inherit them, and a tagged task run acquires a concurrency slot
    per tag (seconds per stage). A tag is a convenience: failing to set one is a warning."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *run_tags(params)}))
    except Exception as e:  # noqa: BLE001 - never fail a run over its tags
        get_run_logger().warning(f"could not tag the flow run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


def require_tracking(cfg, attempts: int = 3) -> None:
    """One line naming the URI when a tracking server does not answer (a few tries with backoff first)."""
    uri = tracking_uri(cfg)
    if not uri.startswith(("http://", "https://")):
        return
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
                if r.status == 200:
                    return
                why = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            why = getattr(reason, "strerror", None) or str(reason)
        if attempt + 1 < attempts:
            time.sleep(2**attempt)
    raise UserError(
        f"MLflow tracking server {uri} is unreachable ({why}); nothing ran "
        "(MLFLOW_TRACKING_URI or tracking.uri in params.yaml)"
    )


@task(task_run_name="{stage} (placed)", retries=0, retry_condition_fn=worth_retrying)
def placed_stage(stage: str, parent_run_id: str, cfg) -> dict:
    """A stage run by a worker of another pool (flows/placement.py); retried like a local one."""
    return run_placed(stage, parent_run_id, cfg)


def run_stages(params, promote: bool, run_name: str | None = None) -> dict | State:
    """The stages in order inside one MLflow parent run, then promotion; a Failed state at the first failure.
    Finished or failed (not crashed), the run leaves its `lmforge-run` table artifact."""
    import mlflow

    names = selected_stages(stage_names(Path.cwd()), params.tasks.enabled)
    placed = set(params.orchestrate.gpu_stages) if params.orchestrate.placement else set()
    if placed - set(names):
        raise UserError(
            f"params.yaml: orchestrate.gpu_stages: {sorted(placed - set(names))} are not stages of dvc.yaml ({names})"
        )
    track_inputs(params)
    results: dict = {"stages": {}}
    steps: dict[str, tuple[str, float]] = {}  # stage or promotion -> (its final state, seconds in this run)
    decisions: dict[str, dict] = {}
    run_name = run_name or f"pipeline {flow_run.name or ''}".strip()
    with mlflow.start_run(
        run_name=run_name, tags={"lmforge.stage": "pipeline", "prefect.flow_run_id": str(flow_run.id or "")}
    ) as parent:
        failed = _run_each_stage(names, placed, parent.info.run_id, params, results, steps) or _promote_each(
            params.tasks.enabled if promote else [], parent.info.run_id, decisions, steps
        )
        run_table_artifact(steps, decisions)
        if failed is not None:
            return failed
        _summarise(parent.info.run_id, params, results, decisions)
    return results


def _run_each_stage(names: list[str], placed: set[str], parent_run_id: str, params, results: dict, steps: dict):
    """Each stage as a Prefect task (placed ones on their pool), its metrics into `results` and its final state and
    seconds into `steps`; the flow's Failed state at the first failure, else None."""
    orchestrate, env = params.orchestrate, stage_env(parent_run_id)
    for stage in names:
        retries, start = RESUMABLE.get(stage, 0), time.perf_counter()
        if stage in placed:
            state = placed_stage.with_options(retries=retries, retry_delay_seconds=5)(
                stage, parent_run_id, orchestrate, return_state=True
            )
        else:
            state = run_stage.with_options(retries=retries, retry_delay_seconds=5)(stage, env, return_state=True)
        steps[stage] = (state.name, time.perf_counter() - start)
        if stage == "validate":  # passed or failed, the Data Docs show what the data looked like
            data_docs_artifact(parent_run_id, params)
        if not state.is_completed():
            _end_failed(stage)
            return _stage_failed(stage, state)
        results["stages"][stage] = state.result()
        if placed and stage not in placed:  # workers share the DVC remote, not a disk
            dvc_transfer.with_options(**io_options(orchestrate))("push", [stage])
    return None


def _promote_each(task_names: list[str], parent_run_id: str, decisions: dict, steps: dict) -> State | None:
    """Each task's gates and promotion in turn, its decision into `decisions`; the flow's Failed state at the first
    refusal, else None."""
    for task_name in task_names:
        start = time.perf_counter()
        decision = promote_candidate(parent_run_id, task_name)
        refused = isinstance(decision, str)  # promotion refused with a one-line reason
        steps[f"promote {task_name}"] = ("Failed" if refused else "Completed", time.perf_counter() - start)
        if refused:
            _end_failed("promote")
            return user_error(decision)
        decisions[task_name] = decision
    return None


def _summarise(parent_run_id: str, params, results: dict, decisions: dict[str, dict]) -> None:
    """A finished run's record: the results in MLflow, the markdown and link artifacts in Prefect."""
    import mlflow

    decision = decisions.get("classification")
    results["promotion"], results["promotions"] = decision, decisions
    mlflow.log_dict(results, "pipeline_results.json")
    others = {
        t: (results["stages"].get(TASKS[t].stages[-1]), decisions.get(t))
        for t in params.tasks.enabled
        if t != "classification"
    }
    costs = {s: m.get("cost") for s, m in results["stages"].items()}
    create_markdown_artifact(
        markdown=summary_markdown(results["stages"].get("evaluate"), decision, costs, others),
        key="lmforge-evaluation",
        description="Test-split evaluation and promotion gates",
    )
    try:
        links_artifact(parent_run_id, decisions, params)
    except Exception as e:  # noqa: BLE001 - links are a convenience: never fail a promoted run over them
        get_run_logger().warning(
            f"could not create the run's link artifacts: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )


def run_table(steps: dict[str, tuple[str, float]], decisions: dict[str, dict]) -> list[dict]:
    """The rows of the run's table artifact: each stage and promotion with its final Prefect state and its seconds
    in this run (an up-to-date stage takes DVC's check only), then each task's gates with their verdicts."""
    rows = [
        {"step": name, "kind": name.split()[0] if name.startswith("promote ") else "stage", "status": state}
        | {"seconds": round(seconds, 1), "detail": ""}
        for name, (state, seconds) in steps.items()
    ]
    for task_name, decision in decisions.items():
        rows += [
            {"step": g["gate"], "kind": f"gate {task_name}", "status": _status(g), "seconds": "", "detail": g["reason"]}
            for g in decision["gates"]
        ]
    return rows


def run_table_artifact(steps: dict[str, tuple[str, float]], decisions: dict[str, dict]) -> None:
    """The `lmforge-run` table artifact; failing to make it is a warning (the run's own outcome is what counts)."""
    try:
        create_table_artifact(
            table=run_table(steps, decisions),
            key="lmforge-run",
            description="Each stage's state and seconds in this run, each gate's verdict",
        )
    except Exception as e:  # noqa: BLE001 - never hide how the run ended behind a failed artifact
        get_run_logger().warning(
            f"could not create the run's table artifact: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )


def run_tags(params, params_file: Path = DEFAULT_PARAMS) -> list[str]:
    """The tags of a flow run started here: the git commit, a digest of params.yaml and where the stages run."""
    digest = file_sha256(params_file)[:12] if params_file.exists() else "none"
    return [f"commit:{git_commit()[:12]}", f"params:{digest}", placement_tag(params.orchestrate)]


def _stage_failed(stage: str, state: State) -> State:
    """The flow's own Failed state for a stage's final one (a task's state cannot be the flow's)."""
    message, code = state.message or f"stage {stage!r} failed", exit_code(state)
    return user_error(message) if code == USER_ERROR_EXIT else Failed(message=message, data=code)


def track_inputs(params) -> None:
    """Version the user data before anything reads it: `dvc add` the inputs DVC does not track yet (in the
    project, not in git), then `dvc push` every input to the default remote. A push that fails after its
    retries is a warning (the data stays in the local DVC cache; `dvc push` later), not a failed run."""
    specs = user_inputs(params.ingest.corpus, params.ingest.labeled)
    if not specs:
        return
    logger = get_run_logger()
    added = [str(p) for p in untracked_inputs(specs)]
    if added:
        res = subprocess.run(dvc_command("add", "--quiet", *added), capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
            raise UserError(f"dvc add {' '.join(added)} failed: {last[0]}")
        more = f" and {len(added) - 5} more" if len(added) > 5 else ""
        logger.info(f"dvc add {' '.join(added[:5])}{more} (commit the new .dvc files and .gitignore entries)")
    tracked = sorted(
        {
            str(d.relative_to(Path.cwd().absolute()))
            for f in expand_inputs(specs)
            if (d := dvc_file(f)) and Path.cwd().absolute() in d.parents
        }
    )
    try:
        dvc_transfer.with_options(**io_options(params.orchestrate))("push", tracked)
    except Exception as e:  # noqa: BLE001 - the data is safe in the local cache: warn, train
        logger.warning(
            f"the input data was not pushed to the DVC remote ({str(e).splitlines()[0][:200]}); run `dvc push` later"
        )


def _end_failed(stage: str) -> None:
    """End the parent run FAILED, naming the stage; if the tracking store is gone too, say so and go on
    (the stage's own failure is what the run reports)."""
    from mlflow.exceptions import MlflowException

    import mlflow

    for record in (lambda: mlflow.set_tag("lmforge.failed_stage", stage), lambda: mlflow.end_run("FAILED")):
        try:
            record()
        except MlflowException as e:  # end_run forgets the run before telling the store: nothing stays open here
            get_run_logger().warning(f"could not record the failure in MLflow ({str(e.message).splitlines()[0][:200]})")


def links_artifact(parent_run_id: str, decisions: dict[str, dict], params) -> None:
    """A Prefect link artifact per run: the MLflow run, each task's registry version (the Data Docs:
    `data_docs_artifact`)."""
    from prefect.artifacts import create_link_artifact

    import mlflow

    uri = tracking_uri(params.tracking)
    exp = mlflow.get_run(parent_run_id).info.experiment_id
    web = (
        uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    )  # `lmforge ui` serves the embedded store there
    links = {"lmforge-mlflow-run": (f"{web}/#/experiments/{exp}/runs/{parent_run_id}", "MLflow run of this pipeline")}
    for task_name, decision in decisions.items():
        if decision and decision.get("version"):
            name = registered_name(TASKS[task_name], params.tracking)
            key = "lmforge-model-version" if task_name == "classification" else f"lmforge-{task_name}-model-version"
            links[key] = (
                f"{web}/#/models/{name}/versions/{decision['version']}",
                f"{name} v{decision['version']} in the MLflow registry",
            )
    for key, (link, description) in links.items():
        create_link_artifact(link=link, key=key, description=description)


def data_docs_artifact(parent_run_id: str, params) -> None:
    """A Prefect link artifact to the Great Expectations Data Docs index, made when validate ends, pass or fail;
    a link is a convenience: failing to make one is a warning."""
    from prefect.artifacts import create_link_artifact

    import mlflow

    try:
        uri = tracking_uri(params.tracking)
        exp = mlflow.get_run(parent_run_id).info.experiment_id
        web = (
            uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        )  # `lmforge ui` serves the embedded store there
        validate = mlflow.search_runs(
            [exp],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`lmforge.stage` = 'validate'",
            max_results=1,
            output_format="list",
        )
        docs = Path(params.paths.data_docs).resolve() / "index.html"
        if validate:  # validate ran in this pipeline: its run holds the Data Docs (viewable in the MLflow UI)
            link = f"{web}/#/experiments/{exp}/runs/{validate[0].info.run_id}/artifacts/validation/data_docs/index.html"
            create_link_artifact(
                link=link,
                key="lmforge-data-docs",
                description="Great Expectations Data Docs of this run's data (MLflow artifact)",
            )
        elif docs.exists():  # DVC found validate up to date: the workspace's Data Docs are those of this data
            create_link_artifact(
                link=docs.as_uri(),
                key="lmforge-data-docs",
                description="Great Expectations Data Docs of this run's data",
            )
    except Exception as e:  # noqa: BLE001 - never fail a run over a link
        get_run_logger().warning(
            f"could not create the Data Docs link artifact: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.pipeline`: the flow, its outcome as one line and an exit code
    (0, 1 crash, 2 user error, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description="Run the lmforge pipeline flow.")
    parser.add_argument("--no-promote", dest="promote", action="store_false", help="skip the gates and promotion")
    parser.add_argument(
        "--lock-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for another run on this workspace"
    )
    args = parser.parse_args(argv)
    return execute(
        "pipeline",
        lambda: pipeline(promote=args.promote, lock_timeout=args.lock_timeout, return_state=True),
        args.lock_timeout,
    )


def execute(what: str, run_flow, lock_timeout: float = DEFAULT_TIMEOUT) -> int:
    """Run a flow in this process (`run_flow()` returns its final state) holding the workspace lock (waiting at most
    `lock_timeout` s), and turn the outcome into one line and an exit code."""
    lifeline.interrupt_on_sigterm()
    # In a session of its own (lmforge pipeline), the flow leads a process group: Prefect's server and
    # the rest go with it if the supervisor dies. Otherwise it only stops itself.
    lifeline.watch(lifeline.stop_group if os.getsid(0) == os.getpid() else lifeline.stop_self())
    try:
        params = load_params()
        require_tracking(params.tracking)  # a bad params.yaml or a dead tracking server: one line before Prefect starts
        # Prefect's temporary server and the MLflow store create or migrate their databases on first use: under
        # the lock, so two first runs in a fresh clone wait for each other instead of migrating at once
        with workspace_lock(Path.cwd(), f"lmforge {what}", lock_timeout):
            state = run_flow()
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(
            f"lmforge: {what} interrupted; finished stages are kept, "
            "a rerun continues from there (pretrain from its last checkpoint)",
            file=sys.stderr,
        )
        return INTERRUPTED_EXIT
    if state.is_completed():
        return 0
    print(f"lmforge: {what} stopped: {state.message}", file=sys.stderr)
    return exit_code(state)


if __name__ == "__main__":
    sys.exit(main())
