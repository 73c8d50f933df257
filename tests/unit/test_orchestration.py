"""Retrain's decision (lineage fingerprints against a real sqlite registry), placement's hand-off helpers,
the schedule, the torchrun launch options and the orchestration commands' one-line errors."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import LMFORGE, ROOT, free_port, write_params

from tasks.ops import dag, lineage
from tasks.ops.registry import move_champion
from tasks.shared.errors import UserError

NAME = "lmforge-classifier"

LOCK = {
    "schema": "2.0",
    "stages": {
        "ingest": {
            "cmd": "python -m tasks.ingest",
            "deps": [{"path": "tasks/ingest.py", "md5": "c1"}, {"path": "data/user", "md5": "d1.dir"}],
            "params": {"params.yaml": {"ingest": {"seed": 1}}},
            "outs": [{"path": "data/raw/corpus.parquet", "md5": "o1"}],
        },
        "pretrain": {
            "cmd": "python -m tasks.pretrain",
            "deps": [{"path": "data/raw/corpus.parquet", "md5": "o1"}, {"path": "tasks/pretrain.py", "md5": "c2"}],
            "params": {"params.yaml": {"pretrain": {"lr": 0.003}}},
            "outs": [{"path": "data/models/lm", "md5": "o2.dir"}, {"path": "metrics/plots/loss.csv", "md5": "o3"}],
        },
    },
}


def write_lock(folder: Path, lock: dict) -> Path:
    f = folder / "dvc.lock"
    f.write_text(yaml.safe_dump(lock, sort_keys=False))
    return f


def changed(path: list, value) -> dict:
    lock = copy.deepcopy(LOCK)
    node = lock
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return lock


@pytest.mark.parametrize(
    "path,value,kind",
    [
        (["stages", "ingest", "deps", 1, "md5"], "d2.dir", "data"),
        (["stages", "pretrain", "deps", 1, "md5"], "c3", "code"),
        (["stages", "pretrain", "params", "params.yaml", "pretrain", "lr"], 0.001, "params"),
    ],
)
def test_fingerprint_changes_in_exactly_the_kind_that_changed(tmp_path, path, value, kind):
    before = lineage.fingerprint(write_lock(tmp_path, LOCK))
    after = lineage.fingerprint(write_lock(tmp_path, changed(path, value)))
    assert {k for k in lineage.KINDS if before[k] != after[k]} == {kind}


@pytest.mark.parametrize(
    "path,value",
    [
        (["stages", "pretrain", "outs", 0, "md5"], "retrained.dir"),  # training need not be bit-exact
        (["stages", "pretrain", "deps", 0, "md5"], "o9"),  # a produced input follows from the others
    ],
)
def test_fingerprint_ignores_outputs_and_produced_inputs(tmp_path, path, value):
    assert lineage.fingerprint(write_lock(tmp_path, LOCK)) == lineage.fingerprint(
        write_lock(tmp_path, changed(path, value))
    )


@pytest.fixture
def registry(tmp_path, monkeypatch, mlflow_db):
    """A sqlite registry, a dvc.lock in the working directory and `dvc status` reporting nothing stale."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    write_lock(tmp_path, LOCK)
    stale: dict = {}
    monkeypatch.setattr(lineage, "stale_stages", lambda root=Path("."), stages=None: stale)
    client = MlflowClient(tracking_uri=mlflow_db)
    (tmp_path / "model").mkdir()
    return client, stale


def register(client, tmp_path: Path, tags: dict, champion: bool = True) -> str:
    try:
        client.create_registered_model(NAME)
    except Exception:
        pass
    mv = client.create_model_version(NAME, source=str(tmp_path / "model"))
    for k, v in tags.items():
        client.set_model_version_tag(NAME, mv.version, k, v)
    if champion:
        move_champion(client, NAME, str(mv.version), "test", None)
    return str(mv.version)


def test_retrain_runs_without_a_champion_and_skips_when_all_three_match(registry, tmp_path):
    client, _ = registry
    c = lineage.compare_with_champion(client, NAME)
    assert c.changed and "no @champion" in c.reason
    register(client, tmp_path, lineage.tags())
    c = lineage.compare_with_champion(client, NAME)
    assert not c.changed and c.champion == "1"
    assert c.reason == f"data, code and params equal the lineage of {NAME} v1 (@champion)"


def test_retrain_names_what_differs_from_the_champion(registry, tmp_path):
    client, _ = registry
    tags = lineage.tags()
    register(client, tmp_path, {**tags, "lineage.params": "0" * 64})
    c = lineage.compare_with_champion(client, NAME)
    assert c.changed and c.reason == f"params differ from the lineage of {NAME} v1 (@champion)"


def test_retrain_runs_when_the_champion_predates_fingerprints(registry, tmp_path):
    client, _ = registry
    register(client, tmp_path, {"gates": "passed"})
    c = lineage.compare_with_champion(client, NAME)
    assert c.changed and "records no lineage fingerprint" in c.reason


def test_retrain_runs_when_dvc_reports_a_stale_stage(registry, tmp_path):
    client, stale = registry
    register(client, tmp_path, lineage.tags())
    stale["pretrain"] = [{"changed deps": {"tasks/pretrain.py": "modified"}}]
    c = lineage.compare_with_champion(client, NAME)
    assert c.changed and "pretrain: changed deps: tasks/pretrain.py (modified)" in c.reason


def test_a_failed_candidate_is_not_the_reference(registry, tmp_path):
    """Only @champion counts: a newer version that failed its gates does not make retrain skip."""
    client, _ = registry
    register(client, tmp_path, {**lineage.tags(), "lineage.code": "x" * 64})
    register(client, tmp_path, lineage.tags(), champion=False)
    assert lineage.compare_with_champion(client, NAME).changed


# ---------------------------------------------------------------------------------------------
# placement hand-off


def test_merge_lock_entry_replaces_one_stage_and_keeps_dvc_yaml_order(tmp_path):
    from flows.placement import merge_lock_entry

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {"cmd": "x"}, "pretrain": {"cmd": "y"}}}))
    lock = copy.deepcopy(LOCK)
    del lock["stages"]["pretrain"]
    write_lock(tmp_path, lock)
    merge_lock_entry("pretrain", LOCK["stages"]["pretrain"], tmp_path)
    merged = yaml.safe_load((tmp_path / "dvc.lock").read_text())
    assert merged == LOCK and list(merged["stages"]) == ["ingest", "pretrain"]
    assert not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob(".*dvc.lock*"))


def test_uncached_outputs_travel_in_the_handoff_cached_ones_through_the_remote(tmp_path, monkeypatch):
    """The stage's small `cache: false` outputs (metrics, plot data) are named from dvc.yaml
    with ${paths.x} resolved."""
    from flows.placement import cached_outs, produced_deps

    for f in ("dvc.yaml", "params.yaml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    lock = {
        "stages": {
            "tokenize": {"outs": [{"path": "data/tokens"}]},
            "pretrain": {
                "deps": [{"path": "data/tokens"}, {"path": "tasks/pretrain.py"}],
                "outs": [
                    {"path": "data/models/lm"},
                    {"path": "metrics/plots/pretrain_train_loss.csv"},
                    {"path": "metrics/plots/pretrain_val_loss.csv"},
                    {"path": "metrics/pretrain.json"},
                ],
            },
        }
    }
    write_lock(tmp_path, lock)
    cached, uncached = cached_outs("pretrain", tmp_path)
    assert cached == ["data/models/lm"]
    assert uncached == [
        "metrics/plots/pretrain_train_loss.csv",
        "metrics/plots/pretrain_val_loss.csv",
        "metrics/pretrain.json",
    ]
    assert produced_deps("pretrain", tmp_path) == ["data/tokens"]


def test_code_md5s_are_what_dvc_records(tmp_path):
    """The worker compares these with its own copy; they must be DVC's md5 so dvc.lock agrees too."""
    from flows.placement import code_md5s

    md5s = code_md5s("pretrain", ROOT)
    assert "dvc.yaml" in md5s and "tasks/pretrain.py" in md5s and "data/tokens" not in md5s
    lock = dag.read_lock(ROOT / "dvc.lock")["pretrain"]
    recorded = {d["path"]: d["md5"] for d in lock["deps"]}
    res = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "tasks/pretrain.py"], cwd=ROOT)
    if res.returncode == 0:  # committed code: the lock of the committed run recorded the same md5
        assert md5s["tasks/pretrain.py"] == recorded["tasks/pretrain.py"]


# ---------------------------------------------------------------------------------------------
# schedule, retries, torchrun, commands


def test_the_schedule_lives_in_prefect_yaml():
    from tasks.ops.schedule import cron_schedule

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    assert (
        cron_schedule()
        == (retrain["schedules"][0]["cron"], retrain["schedules"][0]["timezone"])
        == ("0 3 * * 1", "UTC")
    )
    assert retrain["concurrency_limit"]["limit"] == 1 and retrain["work_pool"]["name"] == "cpu"
    assert {d["work_pool"]["name"] for d in spec["deployments"]} == {"cpu", "gpu"}


def test_a_bad_cron_is_one_line_before_anything_is_served():
    from flows.retrain import serve

    with pytest.raises(UserError, match=r"schedule 'every monday' \(UTC\)"):
        serve("every monday", "UTC")


def test_user_errors_are_not_retried_crashes_are():
    from types import SimpleNamespace

    from flows.stages import StageFailed, worth_retrying
    from tasks.shared.stagerun import USER_ERROR_EXIT

    def state(result):
        return SimpleNamespace(name="Failed", result=lambda raise_on_failure=False: result)

    assert not worth_retrying(None, None, state(UserError("bad")))
    assert not worth_retrying(None, None, state(USER_ERROR_EXIT))
    assert not worth_retrying(None, None, state(StageFailed("x", USER_ERROR_EXIT)))
    assert worth_retrying(None, None, state(StageFailed("killed", -9)))
    assert worth_retrying(None, None, state(RuntimeError("placed stage crashed")))


def test_an_unreachable_tracking_server_is_one_line_naming_it(monkeypatch):
    import socket

    from flows.pipeline import require_tracking
    from tasks.shared.config.base import TrackingConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as e:
        require_tracking(TrackingConfig(), attempts=1)
    assert str(e.value).startswith(f"MLflow tracking server http://127.0.0.1:{port} is unreachable")
    assert "nothing ran" in str(e.value) and "\n" not in str(e.value)


def test_torchrun_options_for_one_machine_and_for_a_rendezvous():
    from pydantic import ValidationError

    from tasks.shared.config.training import DistributedConfig

    assert DistributedConfig(nproc=2).torchrun_args() == ["--standalone", "--nproc-per-node=2"]
    multi = DistributedConfig(nproc=8, nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="run7")
    assert multi.world == 16 and multi.launched
    assert multi.torchrun_args() == [
        "--nnodes=2",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400",
        "--rdzv-id=run7",
    ]
    assert not DistributedConfig().launched
    with pytest.raises(ValidationError, match="rdzv_endpoint"):
        DistributedConfig(nnodes=2)


@pytest.mark.parametrize("args", [["deploy"], ["worker", "--pool", "cpu"]])
def test_deployments_and_workers_need_a_prefect_server(args, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path)
    res = subprocess.run(
        [str(Path(sys.executable).parent / "lmforge"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == (
        "lmforge: error: deployments and workers need a Prefect server: start one (`prefect server start`, "
        "or deploy/stack/stack.sh up) and set PREFECT_API_URL"
    )


def test_a_worker_for_an_unknown_pool_is_refused(tmp_path):
    env = {**__import__("os").environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path)}
    res = subprocess.run(
        [str(Path(sys.executable).parent / "lmforge"), "worker", "--pool", "tpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 2 and res.stderr.strip() == "lmforge: error: unknown pool 'tpu'; lmforge's pools are cpu, gpu"
    )


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the handler's name is http.server's
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_server():
    """The base URL of a server whose /health and /api/health answer 200 (what MLflow's and Prefect's servers do)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("answers", [True, False])
def test_ui_opens_the_configured_servers_instead_of_starting_its_own(tmp_path, answering_server, answers):
    """With MLFLOW_TRACKING_URI / PREFECT_API_URL set, `lmforge ui` prints their URL (or one line if they are down)
    and starts nothing."""
    base = answering_server if answers else f"http://127.0.0.1:{free_port()}"
    write_params(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": base, "PREFECT_API_URL": f"{base}/api"}
    runs = [
        subprocess.run([LMFORGE, "ui", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        for args in ([], ["--prefect"])
    ]
    if answers:
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
        assert runs[0].stdout.startswith(f"MLflow UI: {base} (the project's tracking server; none started)")
        assert runs[1].stdout.startswith(f"Prefect UI: {base}/ (the server in PREFECT_API_URL; none started)")
    else:
        assert [r.returncode for r in runs] == [2, 2]
        assert runs[0].stderr == f"lmforge: error: the MLflow tracking server {base} does not answer " + (
            "(MLFLOW_TRACKING_URI or tracking.uri)\n"
        )
        assert runs[1].stderr == f"lmforge: error: the Prefect server in PREFECT_API_URL ({base}/api) does not answer\n"
