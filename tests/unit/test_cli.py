"""Bad input through the real entry points: one line naming the file and key, exit code 2, no output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import write_params

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, **overrides) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_params(tmp_path, **overrides)
    shutil.copytree(ROOT / "gx", tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted", ".ge_store_backend_id"))
    return tmp_path


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_invalid_param_value_is_one_line_naming_file_and_key(tmp_path):
    cwd = _project(tmp_path, **{"pretrain.lr": -1})
    res = _run(cwd, "-m", "tasks.pretrain")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "params.yaml" in lines[0] and "pretrain.lr" in lines[0]
    assert "Traceback" not in res.stderr


def test_lmforge_check_validates_every_section_before_anything_runs(tmp_path):
    """A stage reads only its own sections; `lmforge check` (and the flow, before its first stage)
    validates the whole file, so a typo in a late section stops a run at once."""
    cwd = _project(tmp_path, **{"finetune.epoch": 3})
    res = _run(cwd, "-m", "tasks.ops.cli", "check")
    assert res.returncode == 2
    assert res.stderr.strip() == "lmforge: error: params.yaml: finetune.epoch: unknown key"


def test_unknown_param_key_is_rejected(tmp_path):
    cwd = _project(tmp_path, **{"finetune.epoch": 3})
    res = _run(cwd, "-m", "tasks.finetune")
    assert res.returncode == 2
    assert "finetune.epoch" in res.stderr and "unknown key" in res.stderr


def test_missing_data_path_names_the_file_and_writes_nothing(tmp_path):
    cwd = _project(tmp_path, **{"ingest.labeled": "data/user/nope.jsonl"})
    res = _run(cwd, "-m", "tasks.ingest")
    assert res.returncode == 2
    (error,) = [line for line in res.stderr.splitlines() if "error" in line]  # MLflow may log INFO lines first
    assert error == "lmforge ingest: error: data/user/nope.jsonl: data path not found"
    assert "Traceback" not in res.stderr
    assert not (cwd / "data" / "raw").exists() or not any((cwd / "data" / "raw").iterdir())
    assert not (cwd / "metrics" / "ingest.json").exists()


def test_empty_data_file_names_the_file(tmp_path):
    cwd = _project(tmp_path, **{"ingest.labeled": "data/user/empty.csv"})
    (cwd / "data" / "user").mkdir(parents=True)
    (cwd / "data" / "user" / "empty.csv").write_text("")
    res = _run(cwd, "-m", "tasks.ingest")
    assert res.returncode == 2
    assert "data/user/empty.csv" in res.stderr and "Traceback" not in res.stderr


def test_missing_upstream_output_is_reported_not_raised(tmp_path):
    cwd = _project(tmp_path)
    res = _run(cwd, "-m", "tasks.clean")
    assert res.returncode == 2
    assert "data/raw/corpus.parquet" in res.stderr and "Traceback" not in res.stderr


def test_lmforge_cli_lists_commands():
    res = subprocess.run(
        [sys.executable, "-m", "tasks.ops.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0
    for command in ("stage", "pipeline", "promote", "rollback", "verify", "serve", "ui", "check", "deps", "check-lock"):
        assert command in res.stdout


def test_non_finite_params_are_refused(tmp_path):
    for i, (key, value) in enumerate(
        (
            ("pretrain.lr", float("inf")),
            ("finetune.weight_decay", float("nan")),
            ("promote.max_latency_ms", float("inf")),
        )
    ):
        cwd = _project(tmp_path / str(i), **{key: value})
        res = _run(cwd, "-m", "tasks.ops.cli", "check")
        assert res.returncode == 2, (key, res.stderr)
        assert res.stderr.strip().splitlines() == [
            f"lmforge: error: params.yaml: {key}: Input should be a finite number (got {value})"
        ]


def test_serve_stops_in_one_line_when_there_is_nothing_to_serve(tmp_path):
    """Before the first pipeline (no registry), or pointed at a folder that is not there: one line, exit 2."""
    cwd = _project(tmp_path)
    res = _run(cwd, "-m", "tasks.ops.cli", "serve")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"lmforge: error: no registered model 'lmforge-classifier' in sqlite:///{cwd}/mlflow.db "
        "(no MLflow store yet): run `make pipeline` first"
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMFORGE_MODEL_URI": str(cwd / "nope")}
    res = subprocess.run(
        [sys.executable, "-m", "tasks.ops.cli", "serve"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"lmforge: error: LMFORGE_MODEL_URI={cwd / 'nope'}: no such folder or model URI"
    ]


def test_rollback_force_needs_a_reason(tmp_path):
    cwd = _project(tmp_path)
    res = _run(cwd, "-m", "tasks.ops.cli", "rollback", "--to", "1", "--force")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        'lmforge: error: --force needs --reason "why": the override is recorded in the registry'
    ]
