"""The team stack (deploy/stack/): real PostgreSQL, `mlflow server` and `prefect server` started by its
scripts on loopback, and lmforge switched over to them by configuration only (`MLFLOW_TRACKING_URI`).

One stack serves the module (state in a temporary folder, free ports); each test first runs
`stack.sh up` for what it needs, which is a no-op when it already runs, so the tests do not depend on
their order. The stack is always stopped at the end, even after a failure.
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
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import TINY_PROJECT, free_port, make_tiny_project, post_json, start_logged, wait_http

ROOT = Path(__file__).resolve().parents[2]
STACK_SH = ROOT / "deploy" / "stack" / "stack.sh"
LMFORGE = str(Path(sys.executable).parent / "lmforge")
MODEL = "lmforge-classifier"
PASSWORD = "t3st:p@ss/w%rd"  # characters that must be escaped in a database URL


def _postgres_installed() -> bool:
    return bool(shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
    """PostgreSQL and `mlflow server` started by `stack.sh up` (prefect is added by its own test).

    The state folder is made with mkdtemp and opened to others (0755): run as root, PostgreSQL runs as
    the `postgres` OS user, which must reach its data folder, and pytest's own temp folders are private.
    """
    folder = Path(tempfile.mkdtemp(prefix="lmforge-stack-"))
    folder.chmod(0o755)
    s = Stack(folder)
    try:
        s.up("postgres", "mlflow")
        yield s
    finally:
        down = s.run("down", timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr


def test_pipeline_on_the_stack_promotes_into_postgres_and_serves_the_champion(stack, tmp_path):
    from mlflow import MlflowClient

    stack.up("postgres", "mlflow")
    # The gates are not under test here; a latency budget a busy 2-core machine cannot miss keeps them out of it.
    project, env = make_tiny_project(tmp_path, {"promote": {**TINY_PROJECT["promote"], "max_latency_ms": 60000.0}})
    env["MLFLOW_TRACKING_URI"] = stack.mlflow_uri  # the only change: configuration

    res = subprocess.run([LMFORGE, "pipeline"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    output = res.stdout + res.stderr
    (tmp_path / "pipeline.log").write_text(output)
    assert res.returncode == 0, output[-6000:] + stack.logs()
    verdict = [line for line in output.splitlines() if any(w in line for w in (" PASS ", " FAIL ", "promoted"))]
    assert f"promoted {MODEL} v1" in output, "\n".join(verdict) or output[-4000:]
    assert "Traceback" not in output, output[-6000:]

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert champion.version == "1"

    # The records are in PostgreSQL, the files under the server's artifacts destination, none in the project.
    assert stack.sql("mlflow", "SELECT name FROM registered_models") == [(MODEL,)]
    (runs,) = stack.sql("mlflow", "SELECT count(*) FROM runs")[0]
    assert runs >= 9, runs  # the pipeline run and a nested run per stage
    (locations,) = stack.sql("mlflow", "SELECT array_agg(artifact_location) FROM experiments WHERE name = 'lmforge'")[0]
    assert locations and all(loc.startswith("mlflow-artifacts:") for loc in locations), locations
    stored = [p for p in (stack.dir / "artifacts").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in stored), [str(p) for p in stored][:20]
    assert not (project / "mlflow" / "artifacts").exists() or not any((project / "mlflow" / "artifacts").iterdir())
    assert not (tmp_path / "mlflow.db").exists()  # the tiny project's default (sqlite) store stayed unused

    port = free_port()
    log = tmp_path / "serve.log"
    server = start_logged([LMFORGE, "serve", "--port", str(port)], project, env, log)
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
        assert {p["model_version"] for p in body} == {
            "lmforge-classifier/1"
        }  # the version promoted into PostgreSQL's registry
        assert all(p["label"] in {"asyncio", "email", "xml"} for p in body), body
    finally:
        _stop_tree(server.pid)
    assert not _port_open(port)


def test_prefect_server_on_postgres_answers_health(stack):
    stack.up("prefect")
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
    first = stack.up()
    pids = stack.pids()
    assert set(pids) == {"postgres", "mlflow", "prefect"}
    second = stack.up()
    assert stack.pids() == pids
    assert second.stderr.count("already running") == 3, second.stderr
    assert second.stdout == first.stdout
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
