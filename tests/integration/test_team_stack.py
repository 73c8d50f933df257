"""The team stack (deploy/stack/) as a team uses it: real PostgreSQL, `mlflow server` and `prefect server`
started by its scripts on loopback, lmforge switched over to them by configuration only (`MLFLOW_TRACKING_URI`,
`PREFECT_API_URL`, a DVC remote), and the `retrain` deployment run by real process workers with placement on.

Two working copies of a tiny project (A, a git clone B) share only the stack's DVC remote folder and its
tracking server. `lmforge deploy` puts the `cpu` and `gpu` work pools and the deployments of prefect.yaml on
the stack's Prefect server; worker A (`lmforge worker --pool cpu`) runs `retrain`, which with
`orchestrate.placement: true` places pretrain and finetune on worker B (`--pool gpu`) through `run_deployment`.
The first retrain (no champion yet) trains everything; B's flow run is SIGKILLed in the middle of pretrain,
Prefect reports it crashed, the caller's task retry places pretrain again and it resumes from B's last
checkpoint. The version it promotes is recorded in PostgreSQL, its files under the server's artifacts, and
`lmforge serve` serves it. The second retrain skips without registering a version; two triggered at once
run one after the other.

One stack serves the module (state in a temporary folder, free ports). It is always stopped at the end, even
after a failure; the last test stops it itself and checks that nothing is left.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import LMFORGE, free_port, make_tiny_project, post_json, start_logged, stop_group, wait_http

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "deploy" / "stack" / "stack.sh"
BIN = Path(sys.executable).parent
MODEL = "lmforge-classifier"
PASSWORD = "t3st:p@ss/w%rd"  # characters that must be escaped in a database URL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _postgres_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


@pytest.fixture(scope="module", autouse=True)
def _postgres_present():
    """`make test` installs PostgreSQL's server first (`make postgres`); a bare pytest without it fails here,
    saying so."""
    assert _postgres_installed(), (
        "PostgreSQL's server (initdb, pg_ctl) is not installed: run `make postgres` (or `make test`)"
    )


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _tree(pid: int) -> list[psutil.Process]:
    """Process `pid` and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_tree(pid: int, seconds: float = 30) -> None:
    """SIGTERM to `pid`'s process group and every descendant (bentoml's worker runs in a session of its
    own), SIGKILL to what is left after `seconds`."""
    procs = _tree(pid)
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    for p in alive:
        p.kill()
    psutil.wait_procs(alive, timeout=10)


class Stack:
    """The scripts' view of one stack: its folder, ports and environment."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.ports = {"postgres": free_port(), "mlflow": free_port(), "prefect": free_port()}
        self.env = {
            **os.environ,
            "LMFORGE_STACK_DIR": str(folder),
            "LMFORGE_PG_PORT": str(self.ports["postgres"]),
            "LMFORGE_MLFLOW_PORT": str(self.ports["mlflow"]),
            "LMFORGE_PREFECT_PORT": str(self.ports["prefect"]),
            "LMFORGE_PG_PASSWORD": PASSWORD,
            "LMFORGE_MLFLOW_WORKERS": "1",
            "LMFORGE_STACK_WORKERS": "0",
        }
        self.mlflow_uri = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.prefect_api = f"http://127.0.0.1:{self.ports['prefect']}/api"
        self.dvc_remote = folder / "dvc-remote"
        self.first_up: subprocess.CompletedProcess | None = None  # what the first `up` printed

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(STACK_SH), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self, *services: str) -> subprocess.CompletedProcess:
        res = self.run("up", *services)
        assert res.returncode == 0, res.stdout + res.stderr + self.logs()
        return res

    def logs(self) -> str:
        return "".join(
            f"\n--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:])
            for f in sorted((self.dir / "logs").glob("*.log"))
        )

    def pids(self) -> dict[str, int]:
        """The main process of every running service, from its pid file."""
        files = {
            "postgres": self.dir / "pg" / "data" / "postmaster.pid",
            **{s: self.dir / "run" / f"{s}.pid" for s in ("mlflow", "prefect")},
        }
        return {s: int(f.read_text().split()[0]) for s, f in files.items() if f.exists()}

    def sql(self, db: str, query: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(
            host="127.0.0.1", port=self.ports["postgres"], user="lmforge", password=PASSWORD, dbname=db
        ) as conn:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchall()


@pytest.fixture(scope="module")
def stack():
    """PostgreSQL, `mlflow server` and `prefect server` started by `stack.sh up`.

    The state folder is made with mkdtemp and opened to others (0755): run as root, PostgreSQL runs as
    the `postgres` OS user, which must reach its data folder, and pytest's own temp folders are private.
    """
    folder = Path(tempfile.mkdtemp(prefix="lmforge-stack-"))
    folder.chmod(0o755)
    s = Stack(folder)
    try:
        s.first_up = s.up()
        yield s
    finally:
        down = s.run("down", timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr


@pytest.fixture(scope="module")
def team(stack, tmp_path_factory):
    """Working copies A and B of a tiny project on the stack, the deployments on its Prefect server, and a
    worker in each copy: A's polls the `cpu` pool, B's the `gpu` pool."""
    base = tmp_path_factory.mktemp("team")
    a, env = make_tiny_project(
        base / "a", {"orchestrate": {"placement": True, "io_retries": 2, "io_retry_delay_s": 1.0}}
    )
    b = base / "b" / "project"
    subprocess.run(["git", "clone", "-q", str(a), str(b)], check=True)
    env = {**env, "MLFLOW_TRACKING_URI": stack.mlflow_uri, "PREFECT_API_URL": stack.prefect_api}  # the switch
    copies = {"a": (a, "cpu"), "b": (b, "gpu")}
    envs = {}
    for name, (copy, _pool) in copies.items():
        subprocess.run(
            [str(BIN / "dvc"), "remote", "add", "--local", "-d", "-f", "team", str(stack.dvc_remote)],
            cwd=copy,
            check=True,
            capture_output=True,
        )
        # the workers ask the server for work every 2 s instead of 10: each hand-over waits less
        envs[name] = {**env, "PREFECT_HOME": str(base / f"prefect-{name}"), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    res = subprocess.run([LMFORGE, "deploy"], cwd=a, env=envs["a"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    workers = {}
    try:
        for name, (copy, pool) in copies.items():
            workers[name] = start_logged(
                [LMFORGE, "worker", "--pool", pool, "--name", f"worker-{name}"],
                copy,
                envs[name],
                base / f"worker-{name}.log",
            )
        yield {"base": base, "a": a, "b": b, "env": envs["a"], "workers": workers}
    finally:
        stop_group(*workers.values())


def run_retrain(env: dict, cwd: Path, timeout: int = 900) -> dict:
    """Trigger the `retrain` deployment and wait: its final state and the Prefect artifacts it left."""
    code = f"""
import json
from prefect import get_client
from prefect.deployments import run_deployment
run = run_deployment("lmforge-retrain/retrain", timeout={timeout}, poll_interval=1)
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


def _kill_when_checkpointed(copy: Path, worker, killed: list[int], seconds: float = 600) -> threading.Thread:
    """In the background: SIGKILL the flow runs of `worker` (its child processes) once pretrain has written a
    checkpoint in `copy`."""

    def watch():
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            runs = _children(worker.pid)
            if _checkpoints(copy) and runs:
                for pid in runs:
                    os.kill(pid, signal.SIGKILL)
                killed.extend(runs)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _exceptions(log: str) -> list[str]:
    """The last line of every traceback in `log`: the exception it ended with."""
    lines = log.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            rest = [x for x in lines[i + 1 :] if x and not x.startswith((" ", "\t", "Traceback"))]
            found.append(rest[0] if rest else "")
    return found


def test_first_retrain_places_stages_survives_a_killed_worker_run_and_promotes_into_postgres(stack, team):
    """No champion and 11 stale stages: retrain runs the pipeline, with pretrain and finetune on worker B.
    B's flow run is SIGKILLed after pretrain's first checkpoint; the caller's retry resumes it there."""
    a, b, uri = team["a"], team["b"], stack.mlflow_uri
    killed: list[int] = []
    watcher = _kill_when_checkpointed(b, team["workers"]["b"], killed)
    first = run_retrain(team["env"], a)
    watcher.join(timeout=5)
    log_a, log_b = ((team["base"] / f"worker-{n}.log").read_text() for n in ("a", "b"))
    assert killed, "the placed pretrain finished before it could be killed"
    assert first["state"] == "COMPLETED", (first, log_a[-4000:], log_b[-4000:])
    assert "Retrain ran" in first["artifacts"]["lmforge-retrain"]
    assert "dvc status reports 20 stage(s) out of date" in first["artifacts"]["lmforge-retrain"], first
    assert {"lmforge-evaluation", "lmforge-mlflow-run", "lmforge-model-version", "lmforge-data-docs"} <= set(
        first["artifacts"]
    )
    assert f"({uri}/#/experiments/" in first["artifacts"]["lmforge-mlflow-run"]
    # the kill: Prefect reports B's flow run crashed, and the retry resumes pretrain from B's checkpoint
    assert "crashed: Process exited with status code: -9" in log_b, log_b[-4000:]
    assert "pretrain: resuming from data/checkpoints/pretrain/step-" in log_b, log_b[-4000:]
    crash = "RuntimeError: placed stage 'pretrain' (flow run "
    assert all(e.startswith(crash) for e in _exceptions(log_a)), _exceptions(log_a)  # no traceback but the crash
    assert f"promoted {MODEL} v1" in log_a, log_a[-4000:]

    mv = champion(uri)
    assert versions(uri) == [mv.version] == ["1"]
    assert all(mv.tags.get(f"lineage.{k}") for k in ("data", "code", "params"))
    # pretrain and finetune ran in B's working copy, the other stages in A's; A ends up current
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = mv.tags["mlflow_parent_run_id"]
    for stage in ("pretrain", "finetune"):
        handoff = client.download_artifacts(parent, f"handoff/{stage}.json", str(team["base"]))
        assert json.loads(Path(handoff).read_text())["workdir"] == str(b.resolve())
        assert (b / "data" / "models" / ("lm" if stage == "pretrain" else "classifier")).is_dir()
    assert not (b / "data" / "models" / "quantized").exists()  # quantize ran in A only
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "--json", "dvc.yaml"], cwd=a, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout) == {}, status.stdout
    assert any(stack.dvc_remote.rglob("*")), "nothing was pushed to the shared DVC remote"

    # The records are in PostgreSQL, the files under the server's artifacts destination, none in the project.
    names = stack.sql("mlflow", "SELECT name FROM registered_models ORDER BY name")
    assert names == [(MODEL,), ("lmforge-encoder",), ("lmforge-extractor",)]  # each task's model, all in PostgreSQL
    (runs,) = stack.sql("mlflow", "SELECT count(*) FROM runs")[0]
    assert runs >= 9, runs  # the pipeline run and a nested run per stage
    (locations,) = stack.sql("mlflow", "SELECT array_agg(artifact_location) FROM experiments WHERE name = 'lmforge'")[0]
    assert locations and all(loc.startswith("mlflow-artifacts:") for loc in locations), locations
    stored = [p for p in (stack.dir / "artifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in stored), [str(p) for p in stored][:20]
    assert not (a / "mlflow" / "artifacts").exists() or not any((a / "mlflow" / "artifacts").iterdir())
    assert not (team["base"] / "a" / "mlflow.db").exists()  # the tiny project's default (sqlite) store stayed unused


def test_serve_loads_the_champion_from_the_postgres_registry(stack, team):
    port = free_port()
    log = team["base"] / "serve.log"
    server = start_logged([LMFORGE, "serve", "--port", str(port)], team["a"], team["env"], log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/readyz", server, log)
        status, body = post_json(
            f"{base}/classify",
            {
                "texts": [
                    "def handle(self, msg):\n    return msg.get_payload()",
                    "async def main():\n    await asyncio.sleep(1)",
                ]
            },
        )
        assert status == 200, body
        assert [set(p) for p in body] == [{"label", "probabilities", "model_version"}] * 2
        assert {p["model_version"] for p in body} == {f"{MODEL}/1"}  # the version promoted into PostgreSQL's registry
        assert all(p["label"] in {"asyncio", "email", "xml"} for p in body), body
    finally:
        _stop_tree(server.pid)
    assert not _port_open(port)


def test_a_second_retrain_skips_and_registers_nothing(stack, team):
    uri = stack.mlflow_uri
    before = versions(uri)
    start = time.perf_counter()
    second = run_retrain(team["env"], team["a"])
    elapsed = time.perf_counter() - start
    assert second["state"] == "COMPLETED", second
    assert "skipped" in second["artifacts"]["lmforge-retrain"] and "v1" in second["artifacts"]["lmforge-retrain"]
    assert versions(uri) == before == ["1"]
    print(f"retrain skip through the deployment: {elapsed:.1f} s")


def test_two_retrains_triggered_at_once_run_one_at_a_time(stack, team):
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
    before = versions(stack.mlflow_uri)
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=team["a"], env=team["env"], capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    runs = sorted(json.loads(res.stdout.strip().splitlines()[-1]), key=lambda r: r["start"])
    assert [r["state"] for r in runs] == ["COMPLETED", "COMPLETED"], runs
    assert runs[1]["start"] >= runs[0]["end"] - 1, runs  # never both running
    assert versions(stack.mlflow_uri) == before  # nothing changed: both skipped


def test_prefect_server_on_postgres_answers_health(stack):
    status, body = _get(f"{stack.prefect_api}/health")
    assert (status, json.loads(body)) == (200, True)
    tables = {t for (t,) in stack.sql("prefect", "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"flow", "flow_run", "deployment", "work_pool"} <= tables, sorted(tables)
    res = stack.run("status")
    assert res.returncode == 0, res.stdout + res.stderr
    assert [line.split()[:2] for line in res.stdout.splitlines()] == [
        ["postgres", "running"],
        ["mlflow", "running"],
        ["prefect", "running"],
    ]


def test_up_twice_is_harmless_and_down_leaves_no_process(stack):
    """Last in the module: it stops the stack."""
    pids = stack.pids()
    assert set(pids) == {"postgres", "mlflow", "prefect"}
    second = stack.up()
    assert stack.pids() == pids
    assert second.stderr.count("already running") == 3, second.stderr
    assert second.stdout == stack.first_up.stdout
    assert f"export MLFLOW_TRACKING_URI={stack.mlflow_uri}\n" in second.stdout
    assert f"export PREFECT_API_URL={stack.prefect_api}\n" in second.stdout

    processes = [p for pid in pids.values() for p in _tree(pid)]
    assert len(processes) > 3  # the servers' children (uvicorn workers, PostgreSQL's backends) are counted too
    res = stack.run("down", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [p.pid for p in processes if _alive(p)] == []
    assert stack.pids() == {}
    assert list((stack.dir / "run").glob("*.pid")) == []
    assert [s for s, port in stack.ports.items() if _port_open(port)] == []
    assert stack.run("status").returncode == 3
