"""The retrain deployment on a real Prefect server with real process workers, placement on.

Two working copies of a tiny project (A, a git clone B) share only a DVC remote folder and an
`mlflow server`; a Prefect server on loopback holds the `cpu` and `gpu` work pools and the deployments
of prefect.yaml (`lmforge deploy`). Worker A (`lmforge worker --pool cpu`) runs `retrain`; with
`orchestrate.placement: true` it places pretrain and finetune on worker B (`--pool gpu`) through
`run_deployment`. The first retrain trains and promotes; the second skips without registering a
version; killing B's flow run in the middle of pretrain makes the caller's retry resume it there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, make_tiny_project, start_logged, stop_group, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent
MODEL = "lmforge-classifier"


def run_retrain(env: dict, cwd: Path, timeout: int = 900) -> dict:
    """Trigger the `retrain` deployment and wait: its final state and the Prefect artifact it left."""
    code = f"""
import json
from prefect import get_client
from prefect.deployments import run_deployment
run = run_deployment("lmforge-retrain/retrain", timeout={timeout})
with get_client(sync_client=True) as c:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
print(json.dumps({{"state": run.state.type.value, "message": run.state.message, "name": run.name,
                  "artifacts": {{a.key: a.data for a in arts if a.key}}}}))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout + 60
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def versions(uri: str) -> list[str]:
    from mlflow import MlflowClient

    return sorted(
        (str(v.version) for v in MlflowClient(tracking_uri=uri).search_model_versions(f"name='{MODEL}'")), key=int
    )


def champion(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri).get_model_version_by_alias(MODEL, "champion")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("deployments")
    a, env = make_tiny_project(
        base / "a", {"orchestrate": {"placement": True, "io_retries": 2, "io_retry_delay_s": 1.0}}
    )
    b = base / "b" / "project"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    remote = base / "dvc-remote"  # the only disk the workers share
    prefect_port, mlflow_port = free_port(), free_port()
    env = {
        **env,
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
    }
    env.pop("PREFECT_HOME")
    procs: list[subprocess.Popen] = []
    try:
        server_env = {**env, "PREFECT_HOME": str(base / "prefect-server")}
        server_env.pop("PREFECT_API_URL")
        procs.append(
            start_logged(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                base,
                server_env,
                base / "prefect-server.log",
            )
        )
        procs.append(
            start_logged(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(mlflow_port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{base}/mlflow.db",
                    "--serve-artifacts",
                    "--artifacts-destination",
                    str(base / "mlflow-artifacts"),
                ],
                base,
                env,
                base / "mlflow-server.log",
            )
        )
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], base / "prefect-server.log")
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", procs[1], base / "mlflow-server.log")
        copies = {"a": (a, "cpu"), "b": (b, "gpu")}
        envs = {}
        for name, (copy, _pool) in copies.items():
            subprocess.run(
                [str(BIN / "dvc"), "remote", "add", "--local", "-d", "-f", "team", str(remote)],
                cwd=copy,
                check=True,
                capture_output=True,
            )
            envs[name] = {**env, "PREFECT_HOME": str(base / f"prefect-{name}")}
        res = subprocess.run(
            [str(BIN / "lmforge"), "deploy"], cwd=a, env=envs["a"], capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stdout + res.stderr
        workers = {}
        for name, (copy, pool) in copies.items():
            workers[name] = start_logged(
                [str(BIN / "lmforge"), "worker", "--pool", pool, "--name", f"worker-{name}"],
                copy,
                envs[name],
                base / f"worker-{name}.log",
            )
            procs.append(workers[name])
        yield {
            "base": base,
            "a": a,
            "b": b,
            "env": envs["a"],
            "envs": envs,
            "workers": workers,
            "mlflow": env["MLFLOW_TRACKING_URI"],
            "remote": remote,
        }
    finally:
        for p in reversed(procs):
            stop_group(p)


def test_retrain_runs_placed_stages_promotes_then_skips(stack):
    a, b, uri = stack["a"], stack["b"], stack["mlflow"]
    first = run_retrain(stack["env"], a)
    logs = {n: (stack["base"] / f"worker-{n}.log").read_text()[-4000:] for n in ("a", "b")}
    assert first["state"] == "COMPLETED", (first, logs)
    assert "Retrain ran" in first["artifacts"]["lmforge-retrain"]
    assert {"lmforge-evaluation", "lmforge-mlflow-run", "lmforge-model-version", "lmforge-data-docs"} <= set(
        first["artifacts"]
    )
    assert f"({uri}/#/experiments/" in first["artifacts"]["lmforge-mlflow-run"]
    mv = champion(uri)
    assert versions(uri) == [mv.version] == ["1"]
    assert all(mv.tags.get(f"lineage.{k}") for k in ("data", "code", "params"))
    # pretrain and finetune ran in B's working copy, the other stages in A's; A ends up current
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = mv.tags["mlflow_parent_run_id"]
    for stage in ("pretrain", "finetune"):
        handoff = client.download_artifacts(parent, f"handoff/{stage}.json", str(stack["base"]))
        assert json.loads(Path(handoff).read_text())["workdir"] == str(b.resolve())
        assert (b / "data" / "models" / ("lm" if stage == "pretrain" else "classifier")).is_dir()
    assert not (b / "data" / "models" / "quantized").exists()  # quantize ran in A only
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], cwd=a, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}, status.stdout
    assert any(stack["remote"].rglob("*")), "nothing was pushed to the shared DVC remote"

    start = time.perf_counter()
    second = run_retrain(stack["env"], a)
    elapsed = time.perf_counter() - start
    assert second["state"] == "COMPLETED", second
    assert (
        "skipped" in second["artifacts"]["lmforge-retrain"]
        and f"v{mv.version}" in second["artifacts"]["lmforge-retrain"]
    )
    assert versions(uri) == [mv.version]
    print(f"retrain skip through the deployment: {elapsed:.1f} s")


def test_two_retrains_triggered_at_once_run_one_at_a_time(stack):
    """The deployment's concurrency limit (1, ENQUEUE) queues the second run until the first has finished."""
    code = (
        """
import json
from prefect import get_client
from prefect.deployments import run_deployment
runs = [run_deployment("lmforge-retrain/retrain", timeout=0) for _ in range(2)]
import time
with get_client(sync_client=True) as c:
    for _ in range(600):
        runs = [c.read_flow_run(r.id) for r in runs]
        if all(r.state.is_final() for r in runs):
            break
        time.sleep(1)
"""
        'print(json.dumps([{"state": r.state.type.value, "start": r.start_time.timestamp(), '
        '"end": r.end_time.timestamp()} for r in runs]))\n'
    )
    before = versions(stack["mlflow"])
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=stack["a"], env=stack["env"], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = sorted(json.loads(res.stdout.strip().splitlines()[-1]), key=lambda r: r["start"])
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"], runs
    assert runs[1]["start"] >= runs[0]["end"] - 1, runs  # never both running
    assert versions(stack["mlflow"]) == before  # nothing changed: both skipped


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _checkpoints(copy: Path) -> list[Path]:
    return sorted((copy / "data" / "checkpoints" / "pretrain").glob("step-*"))


def test_killed_placed_pretrain_resumes_through_the_flows_retry(stack):
    """Worker B's flow run is SIGKILLed mid-pretrain; Prefect marks it crashed, the caller's task retry
    places pretrain again, and it resumes from B's last checkpoint. A params change makes retrain run
    (log_interval: pretrain reruns, bit-exact, so the new version passes the same gates)."""
    a, b = stack["a"], stack["b"]
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["pretrain"]["log_interval"] = 5
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.time()
    worker_b = stack["workers"]["b"]

    import threading

    killed: list[int] = []

    def kill_when_checkpointed():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            new = [p for p in _checkpoints(b) if p.stat().st_mtime > t0]
            runs = _children(worker_b.pid)
            if new and runs:
                for pid in runs:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(runs)
                return
            time.sleep(0.2)

    t = threading.Thread(target=kill_when_checkpointed, daemon=True)
    t.start()
    result = run_retrain(stack["env"], a)
    t.join(timeout=5)
    log_b = (stack["base"] / "worker-b.log").read_text()
    assert killed, "the placed pretrain finished before it could be killed"
    assert result["state"] == "COMPLETED", (result, log_b[-4000:])
    assert "crashed: Process exited with status code: -9" in log_b
    assert "pretrain: starting afresh; removed 2 checkpoint(s) of an earlier run" in log_b
    assert "pretrain: resuming from data/checkpoints/pretrain/step-" in log_b, log_b[-4000:]
    assert versions(stack["mlflow"])[-1] == champion(stack["mlflow"]).version != "1"  # promoted through the gates
