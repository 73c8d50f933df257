"""`lmforge retrain` and `lmforge schedule` on a tiny project, on a Prefect server (the session's; the schedule
starts its own).

The module starts from a copy of the session's reference run (`lmforge pipeline` promoted v1; a retrain
without a champion that trains everything is tests/integration/test_team_stack.py's first retrain). A
retrain right after it skips in seconds and registers nothing; a params change makes two retrains started
at once run exactly one pipeline (the other waits for the workspace and then skips); the schedule served
by `flow.serve` fires and skips. A tracking server that is down at start is one line before anything runs;
one that goes away in the middle of pretraining fails the stage with one line instead of dropping its
metrics.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import LMFORGE, copy_tiny_run, free_port, start_logged, stop_group, update_params, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "lmforge-classifier"


def lmforge(project: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([LMFORGE, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)


def registry(env: dict) -> tuple[list[str], str]:
    """(every version, the champion's) of the project's registry."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    found = sorted((str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")), key=int)
    return found, str(client.get_model_version_by_alias(MODEL, "champion").version)


def dvc_status(project: Path, env: dict) -> dict:
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "dvc.yaml"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout or "{}")


@pytest.fixture(scope="module")
def trained(tiny_flow_run, tmp_path_factory, prefect_api):
    """A tiny project whose `lmforge pipeline` trained and promoted v1 (a copy of the reference run); its runs
    use the session's Prefect server."""
    project, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("retrain"))
    return project, {**env, "PREFECT_API_URL": prefect_api}


def test_retrain_after_a_run_skips_in_seconds_and_registers_nothing(trained):
    project, env = trained
    before = registry(env)
    assert before == (["1"], "1")
    start_ = time.perf_counter()
    res = lmforge(project, env, "retrain")
    elapsed = time.perf_counter() - start_
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    line = (
        f"lmforge retrain: nothing changed: data, code and params equal the lineage of {MODEL} v1 (@champion); "
        "skipped, registered nothing"
    )
    assert line in out, out[-4000:]
    assert "Task run 'run_stage" not in out and "pretrain" not in out  # no stage ran
    assert registry(env) == before
    print(f"retrain skip: {elapsed:.1f} s")
    assert elapsed < 120  # seconds, not a pipeline (that takes minutes here); the README reports the measured time


def test_two_retrains_at_once_run_one_pipeline_and_the_other_skips(trained):
    """After a params change: one retrain runs and promotes v2, the other waits on the workspace lock and
    then finds nothing changed since v2. dvc.lock ends current; the registry gains exactly one version."""
    project, env = trained
    update_params(project, {"evaluate": {"latency_samples": 6}})  # only evaluate reruns
    procs = [
        subprocess.Popen(
            [LMFORGE, "retrain"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ran = [o for o in outs if "running the pipeline: dvc status reports" in o]
    skipped = [o for o in outs if f"equal the lineage of {MODEL} v2 (@champion); skipped" in o]
    assert len(ran) == 1 and len(skipped) == 1, outs
    assert "waiting up to" in skipped[0]  # it waited for the other run's lock, then looked again
    assert "evaluate" in ran[0] and "Task run 'pretrain'" not in ran[0].replace(
        "Task run 'pretrain' - Finished in state Completed()", ""
    )
    assert registry(env) == (["1", "2"], "2")
    assert dvc_status(project, env) == {}


@pytest.fixture(scope="module", autouse=True)
def schedule(tiny_flow_run, tmp_path_factory):
    """`lmforge schedule` firing every minute in a copy of its own, started with the module: the other tests
    run while it waits for its first run (due at the next full minute)."""
    project, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("schedule"))
    log, port = project.parent / "schedule.log", free_port()
    versions = registry(env)
    proc = start_logged([LMFORGE, "schedule", "--cron", "* * * * *", "--port", str(port)], project, env, log)
    try:
        yield {"proc": proc, "log": log, "port": port, "env": env, "versions": versions}
    finally:
        stop_group(proc)


def test_a_tracking_server_down_at_start_is_one_line_and_nothing_runs(trained):
    project, env = trained
    lock = (project / "dvc.lock").read_text()
    port = free_port()
    res = lmforge(project, {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, "retrain", timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"lmforge: error: MLflow tracking server http://127.0.0.1:{port} is unreachable "
        "(Connection refused); nothing ran "
        "(MLFLOW_TRACKING_URI or tracking.uri in params.yaml)"
    ]
    assert (project / "dvc.lock").read_text() == lock


def test_a_tracking_server_that_goes_away_mid_pretrain_fails_the_stage_in_one_line(
    tiny_flow_run, prefect_api, tmp_path
):
    """Metrics are never silently dropped: the stage checks every asynchronous write before it counts as
    done, so DVC does not record it, and the failure names the store. (A longer pretrain than the reference
    run's: it starts afresh, clearing the reference run's checkpoints, and is still training when the server
    goes.)"""
    project, env = copy_tiny_run(tiny_flow_run, tmp_path)
    update_params(project, {"pretrain": {"max_steps": 1000, "checkpoint_interval": 50, "log_interval": 5}})
    recorded = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["pretrain"]  # the reference run's
    checkpoints = project / "data" / "checkpoints" / "pretrain"
    earlier = {p.name for p in checkpoints.glob("step-*")}
    port = free_port()
    server = start_logged(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--serve-artifacts",
            "--artifacts-destination",
            str(tmp_path / "art"),
        ],
        tmp_path,
        env,
        tmp_path / "mlflow-server.log",
    )
    env = {
        **env,
        "PREFECT_API_URL": prefect_api,
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    try:
        wait_http(f"http://127.0.0.1:{port}/health", server, tmp_path / "mlflow-server.log")
        log = tmp_path / "pipeline.log"
        proc = start_logged([LMFORGE, "pipeline"], project, env, log)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not {p.name for p in checkpoints.glob("step-*")} - earlier:
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.2)
        stop_group(server)
        code = proc.wait(timeout=600)
    finally:
        stop_group(server)
    out = log.read_text()
    assert code != 0, out[-5000:]
    assert f"pretrain: starting afresh; removed {len(earlier)} checkpoint(s) of an earlier run" in out, out[-5000:]
    assert len(earlier) == 2  # the reference run keeps its last two
    failed = [line for line in out.splitlines() if "lmforge pretrain: failed: MLflow tracking store" in line]
    assert failed and f"http://127.0.0.1:{port}" in failed[0], out[-5000:]
    assert (
        yaml.safe_load((project / "dvc.lock").read_text())["stages"]["pretrain"] == recorded
    )  # DVC did not record it as done
    assert [
        line
        for line in out.splitlines()
        if line.startswith(
            "lmforge: pipeline stopped: Task run encountered an exception StageFailed: "
            "lmforge pretrain: failed: MLflow tracking store"
        )
    ]
    assert "Traceback" not in out, out[-5000:]


def test_the_schedule_serves_fires_and_skips(schedule):
    """Last in the module: its first run has long been due."""
    proc, log, port = schedule["proc"], schedule["log"], schedule["port"]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "skipped, registered nothing" not in log.read_text():
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(1)
        text = log.read_text()
        assert "skipped, registered nothing" in text, text[-4000:]
        assert (
            "lmforge schedule: serving deployment lmforge-retrain/retrain on `* * * * *` (UTC); next run due " in text
        )
        assert (
            f"lmforge: Prefect server on http://127.0.0.1:{port}" in text
        )  # Prefect's temporary server has no scheduler
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert registry(schedule["env"]) == schedule["versions"]
    time.sleep(1)
    with socket.socket() as s:  # the server it started is gone with it
        assert s.connect_ex(("127.0.0.1", port)) != 0
