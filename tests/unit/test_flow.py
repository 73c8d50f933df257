"""Retry policy of the Prefect flow's stage tasks, the run's table artifact and its tags."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.stages import StageFailed, worth_retrying
from tasks.shared.stagerun import RESUMABLE

ROOT = Path(__file__).resolve().parents[2]


class FinalState:
    name = "Failed"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self, raise_on_failure: bool = True):
        return self.exc


@pytest.mark.parametrize(
    "exc,retry",
    [
        (StageFailed("bad params", 2), False),  # a user error: the same input fails again
        (StageFailed("killed", -9), True),  # a killed worker: the stage resumes from its checkpoint
        (StageFailed("crash", 1), True),
        (RuntimeError("lost connection"), True),
    ],
)
def test_only_crashes_are_retried(exc, retry):
    assert worth_retrying(None, None, FinalState(exc)) is retry


def test_pretrain_is_the_resumable_stage():
    assert RESUMABLE.get("pretrain", 0) >= 1 and "ingest" not in RESUMABLE


def test_the_run_table_lists_each_step_then_each_gate():
    from flows.pipeline import run_table

    steps = {"ingest": ("Completed", 1.234), "pretrain": ("Failed", 20.0), "promote classification": ("Completed", 3)}
    decisions = {
        "classification": {
            "gates": [
                {"gate": "min_accuracy", "status": "pass", "passed": True, "reason": "0.9 >= 0.5"},
                {"gate": "beats_baselines", "status": "not configured", "passed": True, "reason": "report only"},
            ]
        }
    }
    rows = run_table(steps, decisions)
    assert [(r["step"], r["kind"], r["status"], r["seconds"]) for r in rows] == [
        ("ingest", "stage", "Completed", 1.2),
        ("pretrain", "stage", "Failed", 20.0),
        ("promote classification", "promote", "Completed", 3),
        ("min_accuracy", "gate classification", "PASS", ""),
        ("beats_baselines", "gate classification", "not configured", ""),
    ]
    assert rows[3]["detail"] == "0.9 >= 0.5"


def test_runs_are_tagged_with_commit_params_digest_and_placement(tmp_path, monkeypatch):
    import hashlib
    import subprocess

    from flows.pipeline import run_tags
    from tasks.shared.config.params import load_params

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    params_file = ROOT / "params.yaml"
    params = load_params(params_file)
    digest = hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]
    assert run_tags(params, params_file) == [f"commit:{head[:12]}", f"params:{digest}", "placement:local"]
    placed = params.orchestrate.model_copy(update={"placement": True, "gpu_stages": ["pretrain", "finetune"]})
    assert (
        run_tags(params.model_copy(update={"orchestrate": placed}), params_file)[2] == "placement:gpu=pretrain,finetune"
    )
