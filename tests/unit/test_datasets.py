"""Input datasets: each input named by its DVC hash (real `dvc add`), logged as an MLflow dataset, and
which inputs the flow must still `dvc add`."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import yaml

from tasks.shared.datasets import dvc_file, input_digest, log_dataset, untracked_inputs
from tasks.shared.errors import UserError


def _run(*cmd, cwd):
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    _run("git", "init", "-q", cwd=tmp_path)
    _run(sys.executable, "-m", "dvc", "init", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "data" / "docs").mkdir()
    for i in range(3):
        (tmp_path / "data" / "docs" / f"{i}.txt").write_text(f"document {i}\n")
    return tmp_path


def _dvc_md5(dvc) -> str:
    return yaml.safe_load(dvc.read_text())["outs"][0]["md5"]


def test_the_digest_is_the_hash_dvc_records(repo):
    before = input_digest("data/a.jsonl")
    assert before.digest == hashlib.md5((repo / "data" / "a.jsonl").read_bytes()).hexdigest() and before.untracked == [
        "data/a.jsonl"
    ]
    _run(sys.executable, "-m", "dvc", "add", "-q", "data/a.jsonl", "data/docs", cwd=repo)
    after = input_digest("data/a.jsonl")
    assert (
        after.digest == _dvc_md5(repo / "data" / "a.jsonl.dvc") == before.digest and not after.untracked
    )  # DVC 3: a file's md5
    folder = input_digest("data/docs/*.txt")  # every file covered by the folder's .dvc: the folder's .dir hash
    assert (
        folder.digest == _dvc_md5(repo / "data" / "docs.dvc") and folder.digest.endswith(".dir") and folder.files == 3
    )
    both = input_digest(["data/a.jsonl", "data/docs"])
    assert both.digest not in (after.digest, folder.digest) and sorted(both.tracked) == [
        str((repo / "data" / n).absolute()) for n in ("a.jsonl.dvc", "docs.dvc")
    ]
    assert dvc_file(repo / "data" / "docs" / "1.txt") == (repo / "data" / "docs.dvc").absolute()


def test_untracked_inputs_are_what_dvc_add_needs(repo):
    (repo / "data" / "b.csv").write_text("text,label\nb,y\n")
    _run("git", "add", "data/b.csv", cwd=repo)  # in git already: versioned, not DVC's
    assert [str(p) for p in untracked_inputs(["data/docs", "data/*.jsonl", "data/b.csv", "stdlib"], repo)] == [
        "data/docs",
        "data/a.jsonl",
    ]
    _run(sys.executable, "-m", "dvc", "add", "-q", "data/docs", "data/a.jsonl", cwd=repo)
    assert untracked_inputs(["data/docs", "data/*.jsonl"], repo) == []
    (repo / "data" / "docs" / "new.txt").write_text(
        "new"
    )  # inside a tracked folder: `dvc add data/docs` again, not per file
    assert untracked_inputs(["data/docs"], repo) == []
    with pytest.raises(UserError, match="no files match"):
        untracked_inputs(["data/*.parquet"], repo)


def test_log_dataset_names_the_run_input_by_its_digest(repo, capsys):
    import mlflow
    from tasks.shared.tracking import MlflowTracker

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlflow.db")
    mlflow.set_experiment("datasets")  # not an experiment id an earlier test left active in another store
    with mlflow.start_run() as run:
        d = log_dataset(MlflowTracker(run.info.run_id), "labeled", "data/a.jsonl", "unused", context="ingest")
    assert "labeled: not tracked by DVC: data/a.jsonl" in capsys.readouterr().out
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("labeled", d.digest)]
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags["mlflow.data.context"] == "ingest" and tags["dvc.tracked"] == "false" and tags["files"] == "1"


def test_user_inputs_are_every_spec_but_the_stdlib_default_flattened_in_order():
    from tasks.shared.io import user_inputs

    assert user_inputs("stdlib", "stdlib") == []
    assert user_inputs("data/user/corpus", "stdlib") == ["data/user/corpus"]
    assert user_inputs(["a.jsonl", "docs/**/*.md"], "b.csv") == ["a.jsonl", "docs/**/*.md", "b.csv"]
