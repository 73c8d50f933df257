"""Every ingest input is tracked by DVC or refused: inside `paths.user_data` (the ingest stage's DVC dependency)
editing it makes `dvc status` and `lmforge retrain`'s stale check name ingest; outside it (after symlinks and `..`,
a glob by the folder it searches) the whole-file check refuses it in one line naming the key and path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.ops.dag import dvc_command, is_code_dep, load_dvc_yaml, stale_stages
from tasks.ops.lineage import compare_with_champion
from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("corpus", "labeled", "spans", "pairs", "documents")


def _refusal(params: Path) -> str:
    with pytest.raises(UserError) as err:
        load_params(params)
    assert "\n" not in str(err.value)
    return str(err.value)


def _outside_line(params: Path, key: str, spec: str) -> str:
    return (
        f"{params}: ingest.{key}: {spec} is outside paths.user_data (data/user), the ingest stage's DVC dependency, "
        "so its changes would go unseen: move it under data/user or point paths.user_data at its folder"
    )


@pytest.fixture
def project(tmp_path) -> Path:
    """A folder with data/user/, data outside it (mydata/) and a symlink from inside to outside."""
    for folder in ("data/user/docs", "mydata/docs"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "data/user/linked").symlink_to(tmp_path / "mydata", target_is_directory=True)
    return tmp_path


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(
    "spec",
    [
        "mydata/docs/a.jsonl",  # a file
        "mydata/docs",  # a folder
        "mydata/*/*.jsonl",  # a glob
        "**/*.jsonl",  # a glob searching the project root
        "data/user/../../mydata/docs/a.jsonl",  # `..` out of data/user
        "data/user/linked/docs",  # a symlink out of data/user
        "data/user/linked/*/*.jsonl",
    ],
)
def test_an_input_outside_user_data_is_refused_in_one_line(project, key, spec):
    f = write_params(project, **{f"ingest.{key}": spec})
    assert _refusal(f) == _outside_line(f, key, spec)


def test_one_outside_entry_of_a_list_is_named(project):
    f = write_params(project, **{"ingest.corpus": ["data/user/docs", str(project / "mydata" / "docs")]})
    assert _refusal(f) == _outside_line(f, "corpus", str(project / "mydata" / "docs"))


def test_inputs_inside_user_data_are_accepted_however_written(project):
    """Absolute paths, globs and a user_data that is itself a symlink are compared once resolved."""
    (project / "elsewhere").mkdir()
    (project / "elsewhere" / "b.jsonl").write_text("")
    (project / "store").symlink_to(project / "elsewhere", target_is_directory=True)
    inside = {
        "ingest.corpus": [str(project / "data" / "user" / "docs"), "data/user/**/*.md"],
        "ingest.documents": "./data/user/docs/../docs/a.jsonl",
    }
    load_params(write_params(project, **inside))
    load_params(write_params(project, **{"paths.user_data": "store", "ingest.corpus": "elsewhere/b.jsonl"}))


def test_the_stage_run_alone_refuses_an_outside_input(project):
    write_params(project, **{"ingest.corpus": "mydata/docs"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    res = subprocess.run(
        [sys.executable, "-m", "tasks.ingest"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"lmforge ingest: error: {_outside_line(Path('params.yaml'), 'corpus', 'mydata/docs')}"
    ]
    assert not (project / "data" / "raw").exists()


def _dvc(root: Path, *args: str) -> None:
    subprocess.run(dvc_command(*args), cwd=root, check=True, capture_output=True, timeout=120)


def _ingest_repo(root: Path, overrides: dict) -> None:
    """A git + DVC repository whose dvc.yaml holds the project's ingest stage with its data deps and params (its
    command a no-op, its code deps left out): what decides whether DVC sees an input change."""
    real = load_dvc_yaml(ROOT)["stages"]["ingest"]
    stage = {
        "cmd": "python -c pass",
        "deps": [d for d in real["deps"] if not is_code_dep(str(d))],
        "params": real["params"],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": stage}}, sort_keys=False))
    load_params(write_params(root, **overrides))  # accepted by the whole-file check
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _dvc(root, "init", "-q")
    _dvc(root, "repro", "-q")


@pytest.mark.parametrize(
    "spec,edited",
    [
        ("data/user/labeled.jsonl", "data/user/labeled.jsonl"),  # a file
        ("data/user/docs", "data/user/docs/deep/a.jsonl"),  # a folder
        ("data/user/docs/**/*.jsonl", "data/user/docs/deep/a.jsonl"),  # a glob
    ],
)
def test_editing_an_input_inside_user_data_makes_ingest_stale(tmp_path, spec, edited):
    for f in ("data/user/labeled.jsonl", "data/user/docs/deep/a.jsonl"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text(json.dumps({"text": "def f(): pass", "label": "a"}) + "\n")
    _ingest_repo(tmp_path, {"ingest.labeled": spec})
    assert stale_stages(tmp_path) == {}
    with (tmp_path / edited).open("a") as fh:
        fh.write(json.dumps({"text": "def g(): pass", "label": "b"}) + "\n")
    assert list(stale_stages(tmp_path)) == ["ingest"]
    # `lmforge retrain` asks dvc status first, before it looks at the registry (no client needed when stale)
    verdict = compare_with_champion(None, "lmforge-classifier", tmp_path, ["ingest"])
    assert verdict.changed and "dvc status reports 1 stage(s) out of date (ingest;" in verdict.reason


def test_an_input_outside_the_project_is_tracked_once_user_data_points_at_its_folder(tmp_path):
    """The refusal's advice works: with `paths.user_data` at a folder outside the repository, editing an input
    there makes `dvc status` name ingest."""
    outside, repo = tmp_path / "mydata", tmp_path / "repo"
    (outside / "deep").mkdir(parents=True)
    repo.mkdir()
    (outside / "deep" / "labeled.jsonl").write_text(json.dumps({"text": "def f(): pass", "label": "a"}) + "\n")
    _ingest_repo(repo, {"paths.user_data": "../mydata", "ingest.labeled": "../mydata/**/*.jsonl"})
    assert stale_stages(repo) == {}
    with (outside / "deep" / "labeled.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "def g(): pass", "label": "b"}) + "\n")
    assert list(stale_stages(repo)) == ["ingest"]
