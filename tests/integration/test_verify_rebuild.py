"""`lmforge verify` on a copy of the session's reference run: the registered version is rebuilt from its lineage in a
temporary git worktree and every file it would register is identical; a version it cannot rebuild is refused in
one line. (Which file and stage differ first when one does: tests/unit/test_verify.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import LMFORGE, copy_tiny_run

pytestmark = pytest.mark.integration

NAME = "lmforge-classifier"


@pytest.fixture(scope="module")
def project(tiny_flow_run, tmp_path_factory) -> tuple[Path, dict]:
    return copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("verify"))


def _verify(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LMFORGE, "verify", *args], cwd=project, env=env, capture_output=True, text=True, timeout=900)


def _runs(env: dict) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def _set_tag(env: dict, version: str, key: str, value: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).set_model_version_tag(NAME, version, key, value)


def test_verify_rebuilds_the_registered_version_bit_for_bit(project):
    project, env = project
    runs = _runs(env)
    res = _verify(project, env, "1")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"reproduced {NAME} v1: ") and " artifacts identical" in last, out[-3000:]
    assert int(last.split(": ")[1].split()[0]) > 20  # bundle, code and environment files: all but MLmodel
    assert "Running stage 'pretrain'" in out and "Running stage 'evaluate'" not in out  # streamed; evaluate not needed
    # the worktree and its temp folder are gone; the rebuild logged nothing into the project's MLflow store
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert len(worktrees.strip().splitlines()) == 1, worktrees
    rebuilt_in = next(line.rsplit(" in ", 1)[1] for line in out.splitlines() if line.startswith("verify: dvc repro"))
    assert Path(rebuilt_in).parent.name.startswith("lmforge-verify-") and not Path(rebuilt_in).parent.exists()
    assert _runs(env) == runs


def test_versions_that_cannot_be_rebuilt_are_refused_in_one_line(project, monkeypatch):
    """In process (the refusals come before any rebuild): `lmforge verify` as the CLI runs it."""
    from typer.testing import CliRunner

    from tasks.ops.cli import app

    project, env = project
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])

    def refused(version: str) -> str:
        res = CliRunner().invoke(app, ["verify", version, "--params", str(project / "params.yaml")])
        assert res.exit_code == 2, res.output
        assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
        return res.output.strip()

    assert refused("7") == f"lmforge: error: no version '7' of registered model '{NAME}'"
    _set_tag(env, "1", "git_dirty", "tasks/finetune.py")
    assert "built from uncommitted code (tasks/finetune.py)" in refused("1")
    _set_tag(env, "1", "git_dirty", "no")
    _set_tag(env, "1", "git_commit", "0" * 40)
    assert "which this repository does not have" in refused("1")
