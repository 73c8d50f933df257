"""A stage replaces only outputs lmforge wrote; a path pointed at your own files is refused, untouched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError
from tasks.shared.outputs import LEDGER, check_replaceable, declared_outputs, record

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with the project's dvc.yaml and a .dvc directory, as the working directory."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _user_folder(p: Path) -> Path:
    p.mkdir(parents=True)
    (p / "thesis.tex").write_text("years of work")
    (p / "sub").mkdir()
    (p / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return p


def test_declared_outputs_resolve_paths_and_name_their_keys(project):
    paths = load_params(write_params(project)).paths
    outs = declared_outputs("pretrain", paths)
    assert outs[Path("data/models/lm")] == "paths.lm"
    assert outs[Path("metrics/pretrain.json")] == "paths.metrics"
    assert Path("metrics/plots/pretrain_train_loss.csv") in outs


@pytest.mark.parametrize(
    "stage,key,value",
    [
        ("pretrain", "lm", "mine/models"),  # a folder with files in it
        ("evaluate", "evaluation", "docs"),
        ("ingest", "raw_corpus", "mine/corpus.parquet"),  # a file of yours
        ("validate", "data_docs", "mine"),
        ("ingest", "metrics", "mine"),  # a metrics file would land on yours
    ],
)
def test_an_existing_path_lmforge_did_not_write_is_refused_by_key(project, stage, key, value):
    _user_folder(project / "mine")
    (project / "mine" / "models").mkdir()
    (project / "mine" / "models" / "weights.bin").write_bytes(b"\0" * 10)
    (project / "mine" / "corpus.parquet").write_bytes(b"PAR1")
    (project / "mine" / "ingest.json").write_text("{}")
    _user_folder(project / "docs")
    paths = load_params(write_params(project, **{f"paths.{key}": value})).paths
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    with pytest.raises(
        UserError,
        match=rf"^params.yaml: paths.{key}: .* is an existing (folder|file) that lmforge did not write; refusing",
    ):
        check_replaceable(stage, paths)
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


def test_outputs_lmforge_owns_may_be_replaced(project):
    paths = load_params(write_params(project, **{"paths.lm": "models/lm"})).paths
    (project / "models" / "lm").mkdir(parents=True)
    check_replaceable("pretrain", paths)  # an empty folder
    (project / "models" / "lm" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError):
        check_replaceable("pretrain", paths)
    record("pretrain", paths)  # written by the stage: now lmforge's
    check_replaceable("pretrain", paths)
    assert "models/lm" in (project / LEDGER).read_text()


def test_outputs_recorded_in_dvc_lock_may_be_replaced(project):
    paths = load_params(write_params(project)).paths
    _user_folder(project / "data" / "models" / "lm")
    (project / "dvc.lock").write_text(
        yaml.safe_dump(
            {"schema": "2.0", "stages": {"pretrain": {"outs": [{"path": "data/models/lm", "md5": "x.dir"}]}}}
        )
    )
    check_replaceable("pretrain", paths)


def test_nothing_is_checked_outside_a_dvc_project(project):
    shutil.rmtree(project / ".dvc")
    _user_folder(project / "data" / "models" / "lm")
    check_replaceable("pretrain", load_params(write_params(project)).paths)


def test_the_stage_refuses_before_doing_any_work(project):
    """`python -m tasks.evaluate` with paths.evaluation on a folder of yours: one line, exit 2, files intact."""
    _user_folder(project / "reports")
    write_params(project, **{"paths.evaluation": "reports"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    res = subprocess.run(
        [sys.executable, "-m", "tasks.evaluate"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "lmforge evaluate: error: params.yaml: paths.evaluation: reports is an existing folder "
        "that lmforge did not write; "
        "refusing to replace it (point paths.evaluation elsewhere, or move it away)"
    ]
    assert (project / "reports" / "thesis.tex").read_text() == "years of work"
    assert not (project / "mlflow.db").exists()  # refused before even opening a run
