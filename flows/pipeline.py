"""The lmforge pipeline as a Prefect flow.

Each stage runs through DVC (`dvc repro --single-item <stage>`), so DVC alone decides what is stale
and dvc.lock stays current whichever driver ran. The flow adds one MLflow parent run (stages open
nested runs under it), a per-workspace global concurrency limit (DVC holds a repo lock), the
promotion decision and a Prefect artifact summarising the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its own output (already in the logs) says why."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


USER_ERROR_EXIT = 2  # a stage's one-line user error (tasks/shared/harness.py): retrying cannot help
RESUMABLE = {"pretrain": 2}  # stages that continue from their last checkpoint: retries are cheap


def worth_retrying(task, task_run, state) -> bool:
    """Retry crashes (killed worker, lost device), not bad input."""
    exc = state.result(raise_on_failure=False)
    return not (isinstance(exc, StageFailed) and exc.returncode == USER_ERROR_EXIT)


def workspace_limit(project: Path) -> str:
    """Name of the global concurrency limit that serialises `dvc repro` on one workspace."""
    return "lmforge-dvc-" + hashlib.sha1(str(project.resolve()).encode()).hexdigest()[:10]


def ensure_limit(name: str) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, 1)


@task(task_run_name="{stage}", retries=0, retry_condition_fn=worth_retrying)
def run_stage(stage: str, env: dict[str, str]) -> dict:
    """`dvc repro --single-item <stage>`, streaming its output into the Prefect logs."""
    from tasks.ops.dag import dvc_command

    logger = get_run_logger()
    proc = subprocess.Popen(
        dvc_command("repro", "--quiet", "--single-item", stage),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    last = ""
    assert proc.stdout is not None
    for chunk in proc.stdout:
        for line in re.split(r"[\r\n]", chunk):
            line = line.rstrip()
            if line and line != last:  # progress bars redraw the same line
                logger.info(line)
                last = line
    if proc.wait() != 0:
        stage_code = re.search(r"exited with (-?\d+)", last)  # dvc reports the command's own exit code
        code = int(stage_code.group(1)) if stage_code else proc.returncode
        raise StageFailed(f"stage {stage!r} failed (dvc repro exit code {proc.returncode}): {last}", code)
    from tasks.shared.config.params import load_params

    metrics = Path(load_params().paths.metrics) / f"{stage}.json"
    return json.loads(metrics.read_text()) if metrics.exists() else {}


@task(retries=0)
def promote_candidate(parent_run_id: str) -> dict:
    """Apply the promotion gates and move `champion` only if all pass."""
    from tasks.ops.promote import run as promote_run
    from tasks.shared.config.params import load_params
    from tasks.shared.tracking import PARENT_RUN_ENV

    os.environ[PARENT_RUN_ENV] = parent_run_id
    decision = promote_run(load_params(), flow_run_id=str(flow_run.id or ""))
    return {
        "variant": decision.variant,
        "version": decision.version,
        "promoted": decision.promoted,
        "gates": [{"gate": g.name, "passed": g.passed, "reason": g.reason} for g in decision.gates],
    }


def summary_markdown(evaluation: dict, decision: dict | None) -> str:
    rows = ["| model | accuracy | macro-F1 | p50 latency (ms) | size (MB) |", "|---|---|---|---|---|"]
    for name, m in {**evaluation.get("variants", {}), **evaluation.get("baselines", {})}.items():
        lat = m.get("latency_p50_ms", "")
        rows.append(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {lat} | {m.get('size_mb', '')} |")
    text = "## Test-split evaluation\n\n" + "\n".join(rows)
    if decision:
        verdict = "promoted to @champion" if decision["promoted"] else "not promoted"
        gates = "\n".join(f"- {'PASS' if g['passed'] else 'FAIL'} **{g['gate']}**: {g['reason']}" for g in decision["gates"])
        text += f"\n\n## Promotion: {decision['variant']} v{decision['version']} {verdict}\n\n{gates}\n"
    return text


@flow(name="lmforge-pipeline", log_prints=True)
def pipeline(promote: bool = True) -> dict:
    """Run every stage of the project in the working directory through DVC inside one MLflow
    parent run, then gate and promote."""
    import mlflow

    from tasks.ops.dag import stage_names
    from tasks.shared.config.params import load_params
    from tasks.shared.tracking import PARENT_RUN_ENV, setup_tracking

    setup_tracking(load_params().tracking)  # validates all of params.yaml before any stage runs
    limit = workspace_limit(Path.cwd())
    ensure_limit(limit)
    results: dict = {"stages": {}}
    with mlflow.start_run(run_name=f"pipeline {flow_run.name or ''}".strip(), tags={"lmforge.stage": "pipeline", "prefect.flow_run_id": str(flow_run.id or "")}) as parent:
        env = {**os.environ, PARENT_RUN_ENV: parent.info.run_id, "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}
        # dvc.yaml's `python -m tasks.<stage>` must find this interpreter even when the venv is not activated
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with concurrency(limit, occupy=1, strict=True):
            for stage in stage_names(Path.cwd()):
                retries = RESUMABLE.get(stage, 0)
                results["stages"][stage] = run_stage.with_options(retries=retries, retry_delay_seconds=5)(stage, env)
            decision = promote_candidate(parent.info.run_id) if promote else None
        results["promotion"] = decision
        evaluation = results["stages"]["evaluate"]
        mlflow.log_dict(results, "pipeline_results.json")
        create_markdown_artifact(markdown=summary_markdown(evaluation, decision), key="lmforge-evaluation", description="Test-split evaluation and promotion gates")
    return results


if __name__ == "__main__":
    pipeline()
