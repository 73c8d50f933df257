"""Stages placed on another worker: a `gpu` pool worker runs pretrain and finetune, sharing no disk.

With `orchestrate.placement: true` the pipeline flow (running on a `cpu` worker, or here) does not run
the `gpu_stages` itself. For each, it calls the deployment `lmforge-stage/gpu` (prefect.yaml) with
`run_deployment`, and a worker of the `gpu` pool runs `stage` below in its own working copy:

1. the caller pushes the outputs the stage needs to the DVC remote (`dvc push` after each stage);
2. the worker checks that its code is the caller's (md5 of the stage's code deps), takes the caller's
   params.yaml and dvc.lock (so DVC knows which versions to fetch), `dvc pull`s the stage's inputs,
   runs it with `dvc repro --single-item` (retried from its last checkpoint like any run), and
   `dvc push`es its outputs;
3. the hand-off — the stage's new dvc.lock entry and its small uncached outputs (metrics, plot data) —
   goes to the pipeline's MLflow parent run as `handoff/<stage>.json`: the tracking store is the other
   thing the workers share;
4. the caller merges that entry into its dvc.lock, writes the small files, `dvc pull`s the stage's
   outputs and checks with `dvc status` that the stage is now up to date here.

The DVC and MLflow steps are I/O: they are retried with exponential backoff and jitter. A user error
(bad params, a code mismatch) is not.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.states import Failed
from prefect.tasks import exponential_backoff

from flows.stages import exit_code, is_user_error, run_stage, user_error
from tasks.ops.dag import (
    dvc_command,
    dvc_md5,
    is_code_dep,
    load_dvc_yaml,
    read_lock,
    resolve_refs,
    stage_names,
    stale_stages,
)
from tasks.ops.lock import workspace_lock
from tasks.shared.config.base import read_params_file
from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError
from tasks.shared.io import atomic_file
from tasks.shared.stagerun import RESUMABLE, error_line, stage_env
from tasks.shared.tracking import setup_tracking

HANDOFF = "handoff/{}.json"
LOCK_FILE = "dvc.lock"
PARAMS_FILE = "params.yaml"


class TransferFailed(RuntimeError):
    """A DVC or MLflow transfer failed (network, remote); worth retrying."""


def placement_tag(cfg) -> str:
    """Where a run's stages run, as a flow-run tag: `placement:local`, or `placement:gpu=<stages on the gpu pool>`."""
    return f"placement:gpu={','.join(cfg.gpu_stages)}" if cfg.placement else "placement:local"


def not_user_error(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, UserError)


def io_task(fn):
    """A Prefect task for an I/O step: its retries and backoff come from `orchestrate:` (with_options)."""
    return task(fn, retries=0, retry_condition_fn=not_user_error, retry_jitter_factor=0.5)


def io_options(cfg) -> dict:
    """Retries with exponential backoff (jitter from `io_task`) and a timeout, from `orchestrate:`."""
    delay = exponential_backoff(backoff_factor=cfg.io_retry_delay_s) if cfg.io_retries else 0
    return {"retries": cfg.io_retries, "retry_delay_seconds": delay, "timeout_seconds": cfg.io_timeout_s}


@io_task
def dvc_transfer(action: str, targets: list[str], root: str = ".") -> None:
    """`dvc push|pull <targets>`; a failure is a TransferFailed with DVC's last line."""
    if not targets:
        return
    res = subprocess.run(dvc_command(action, "--quiet", *targets), cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        raise TransferFailed(f"dvc {action} {' '.join(targets)} failed: {last[0]}")


def stage_entry(stage: str, root: Path = Path(".")) -> dict:
    entry = read_lock(root / LOCK_FILE).get(stage)
    if not entry:
        raise UserError(f"{root / LOCK_FILE}: has no entry for stage {stage!r} after it ran")
    return entry


def produced_deps(stage: str, root: Path = Path(".")) -> list[str]:
    """The stage's deps that other stages produce (what a worker must pull before running it)."""
    lock = read_lock(root / LOCK_FILE)
    produced = {o["path"] for s, body in lock.items() if s != stage for o in body.get("outs") or []}
    return sorted(d["path"] for d in (lock.get(stage) or {}).get("deps") or [] if d["path"] in produced)


def cached_outs(stage: str, root: Path = Path(".")) -> tuple[list[str], list[str]]:
    """The stage's outputs in dvc.lock: (cached ones, which travel through the DVC remote; uncached ones
    — metrics, plot data — which travel in the hand-off)."""
    uncached = _uncached(stage, root)
    outs = [o["path"] for o in stage_entry(stage, root).get("outs") or []]
    return [o for o in outs if o not in uncached], sorted(uncached)


def _uncached(stage: str, root: Path) -> set[str]:
    """Paths of the stage's outs and metrics marked `cache: false` in dvc.yaml, with ${paths.x} resolved."""
    params = read_params_file(root / PARAMS_FILE)
    body = (load_dvc_yaml(root).get("stages") or {}).get(stage) or {}
    found = set()
    for kind in ("outs", "metrics", "plots"):
        for item in body.get(kind) or []:
            if isinstance(item, dict):
                for path, opts in item.items():
                    if isinstance(opts, dict) and opts.get("cache") is False:
                        found.add(resolve_refs(path, params))
    return found


def code_md5s(stage: str, root: Path = Path(".")) -> dict[str, str]:
    """md5 of each project source file the stage depends on (dvc.yaml's code deps), as DVC computes it."""
    body = (load_dvc_yaml(root).get("stages") or {}).get(stage)
    if body is None:
        raise UserError(f"dvc.yaml: no stage {stage!r}")
    files = ["dvc.yaml", *(d for d in body.get("deps") or [] if is_code_dep(d))]
    return {f: dvc_md5(root / f) if (root / f).exists() else "missing" for f in files}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)


def merge_lock_entry(stage: str, entry: dict, root: Path = Path(".")) -> None:
    """Replace the stage's entry in dvc.lock (atomically), keeping the rest of the file as DVC wrote it."""
    from io import StringIO

    from ruamel.yaml import YAML

    yaml = YAML()
    f = root / LOCK_FILE
    lock = (yaml.load(f.read_text()) if f.exists() else None) or {"schema": "2.0", "stages": {}}
    stages = lock.setdefault("stages", {})
    stages[stage] = entry
    order = stage_names(root)  # dvc.lock lists stages in dvc.yaml order
    for name in sorted(stages, key=lambda s: order.index(s) if s in order else len(order)):
        stages[name] = stages.pop(name)
    buf = StringIO()
    yaml.dump(lock, buf)
    _write_atomic(f, buf.getvalue().encode())


@flow(name="lmforge-stage", log_prints=True)
def stage(
    name: str, params_yaml: str, dvc_lock: str, code: dict[str, str], parent_run_id: str, lock_timeout: float = 3600.0
) -> dict:
    """Run one pipeline stage in this worker's working copy, exchanging data through the DVC remote.

    `params_yaml` and `dvc_lock` are the caller's files; `code` the md5 of the stage's code deps there.
    """
    root = Path.cwd()
    logger = get_run_logger()
    try:
        here = code_md5s(name, root)
        differ = sorted(f for f in code if here.get(f) != code[f])
        if differ:
            raise UserError(
                f"worker's working copy {root} has other code than the caller for stage {name!r}: "
                f"{', '.join(differ[:5])}; check out the same commit on both"
            )
        with workspace_lock(root, f"lmforge stage {name} (placed)", lock_timeout):
            _write_atomic(root / PARAMS_FILE, params_yaml.encode())
            _write_atomic(root / LOCK_FILE, dvc_lock.encode())
            cfg = load_params(root / PARAMS_FILE)
            setup_tracking(cfg.tracking)
            require_run(parent_run_id)
            opts = io_options(cfg.orchestrate)
            inputs = produced_deps(name, root)
            logger.info(f"pulling {len(inputs)} input(s) of {name} from the DVC remote: {', '.join(inputs)}")
            dvc_transfer.with_options(**opts)("pull", inputs, str(root))
            env = stage_env(parent_run_id)
            state = run_stage.with_options(retries=RESUMABLE.get(name, 0), retry_delay_seconds=5)(
                name, env, return_state=True
            )
            if not state.is_completed():  # the flow's own state (a task's state cannot be the flow's)
                message = state.message or f"stage {name!r} failed"
                return user_error(message) if is_user_error(state) else Failed(message=message, data=exit_code(state))
            cached, uncached = cached_outs(name, root)
            dvc_transfer.with_options(**opts)("push", cached, str(root))
            handoff = {
                "stage": name,
                "worker": os.uname().nodename,
                "workdir": str(root),
                "lock_entry": stage_entry(name, root),
                "files": {
                    p: base64.b64encode((root / p).read_bytes()).decode() for p in uncached if (root / p).is_file()
                },
            }
            publish_handoff.with_options(**opts)(parent_run_id, name, handoff)
    except UserError as e:
        return user_error(error_line(name, e))  # its name tells the caller not to retry
    logger.info(f"{name} done on {handoff['worker']}; outputs pushed: {', '.join(cached)}")
    return {"stage": name, "worker": handoff["worker"], "outs": cached}


def require_run(run_id: str) -> None:
    """The caller's MLflow run must be in this worker's tracking store: the hand-off goes through it."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise
        import mlflow

        raise UserError(
            f"the pipeline's MLflow run {run_id} is not in this worker's tracking store {mlflow.get_tracking_uri()}; "
            "set MLFLOW_TRACKING_URI to the shared tracking server on every worker"
        ) from None


@io_task
def publish_handoff(parent_run_id: str, name: str, handoff: dict) -> None:
    from mlflow import MlflowClient

    MlflowClient().log_dict(parent_run_id, handoff, HANDOFF.format(name))


@io_task
def fetch_handoff(parent_run_id: str, name: str) -> dict:
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="lmforge-handoff-") as tmp:
        path = MlflowClient().download_artifacts(parent_run_id, HANDOFF.format(name), tmp)
        return json.loads(Path(path).read_text())


def run_placed(name: str, parent_run_id: str, cfg, root: Path = Path(".")):
    """Caller side: run stage `name` on the `cfg.gpu_deployment` worker and take its outputs here.

    Returns the stage's metrics, or a Failed state (user error, or the remote flow run's failure)."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    opts = io_options(cfg)
    upstream = produced_deps(name, root)
    dvc_transfer.with_options(**opts)("push", upstream, str(root))
    params = {
        "name": name,
        "params_yaml": (root / PARAMS_FILE).read_text(),
        "dvc_lock": (root / LOCK_FILE).read_text() if (root / LOCK_FILE).exists() else "",
        "code": code_md5s(name, root),
        "parent_run_id": parent_run_id,
    }
    logger.info(f"placing {name} on deployment {cfg.gpu_deployment}")
    run = run_deployment(cfg.gpu_deployment, parameters=params, timeout=cfg.stage_timeout_s, as_subflow=True)
    if not run.state or not run.state.is_completed():
        state = run.state
        if state is None or not state.is_final():
            from prefect import get_client

            with get_client(sync_client=True) as client:  # gave up waiting: do not leave it running
                client.set_flow_run_state(
                    run.id, Failed(message=f"cancelled by the caller after {cfg.stage_timeout_s:.0f} s"), force=True
                )
            raise RuntimeError(
                f"stage {name!r} on {cfg.gpu_deployment} did not finish within "
                f"orchestrate.stage_timeout_s={cfg.stage_timeout_s:.0f}"
            )
        message = state.message or f"stage {name!r} on {cfg.gpu_deployment} ended {state.type.value}"
        if is_user_error(state):  # the stage's own one-line user error, or the worker's
            return user_error(message)
        raise RuntimeError(f"placed stage {name!r} (flow run {run.name}) ended {state.type.value}: {message}")
    handoff = fetch_handoff.with_options(**opts)(parent_run_id, name)
    merge_lock_entry(name, handoff["lock_entry"], root)
    for path, data in handoff["files"].items():
        _write_atomic(root / path, base64.b64decode(data))
    cached = [o["path"] for o in handoff["lock_entry"].get("outs") or [] if o["path"] not in handoff["files"]]
    dvc_transfer.with_options(**opts)("pull", cached, str(root))
    if name in stale_stages(root):
        raise UserError(
            f"stage {name!r} from worker {handoff['worker']} is not up to date here after the hand-off (dvc status); "
            "are both working copies on the same commit?"
        )
    logger.info(f"{name} ran on {handoff['worker']} ({handoff['workdir']}); outputs pulled from the DVC remote")

    metrics = Path(root) / load_params(root / PARAMS_FILE).paths.metrics / f"{name}.json"
    return json.loads(metrics.read_text()) if metrics.exists() else {}
