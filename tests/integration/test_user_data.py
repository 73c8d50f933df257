"""A user's own data through the real flow (`lmforge pipeline`): the inputs are `dvc add`-ed and pushed to
the default remote, logged in MLflow under their DVC hash, cleaned and validated; data that breaks the
contract stops the run at validate, before tokenize, with a summary naming the failed expectation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_project

pytestmark = pytest.mark.integration


def _write_user_data(project: Path) -> None:
    user = project / "data" / "user"
    (user / "docs").mkdir(parents=True)
    for i in range(40):
        (user / "docs" / f"note{i}.md").write_text(
            f"# Note {i}\n\nWrite to ops{i}@example.com about server 10.0.{i}.7; " + "the ticket system " * 5
        )
    rows = [
        {
            "ticket_id": f"t{i}",
            "body": f"Ticket {i}: the printer on floor {i % 7} is "
            + ("jammed again " if i % 4 else "out of toner ") * 4,
            "category": (" Hardware" if i % 4 else "SUPPLIES "),
        }
        for i in range(160)
    ]
    (user / "tickets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_user_data_is_versioned_logged_and_stopped_at_validate(tmp_path, prefect_api):
    """75% / 25% classes against a contract that wants 30% per class: the run stops at validate."""
    project, env = make_tiny_project(
        tmp_path,
        {
            "ingest": {
                "corpus": "data/user/docs/*.md",
                "labeled": ["data/user/tickets.jsonl"],
                "text_column": "body",
                "label_column": "category",
                "id_column": "ticket_id",
                "min_examples_per_label": 10,
            },
            "clean": {"label_case": "lower", "label_aliases": {"supplies": "consumables"}, "near_dup": False},
            "validate": {"min_corpus_rows": 20, "min_rows_per_label": 1, "min_class_share": 0.3},
        },
    )
    env["PREFECT_API_URL"] = prefect_api  # the session's Prefect server
    _write_user_data(project)
    before = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    lmforge = str(Path(sys.executable).parent / "lmforge")
    res = subprocess.run([lmforge, "pipeline"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert (
        "data validation failed" in out
        and "classes: expect_column_values_to_be_between(share" in out
        and "consumables" in out
    ), out[-4000:]
    # ingest and clean ran on the user data; nothing downstream did: no tokenizer, tokenize's lock entry as
    # committed, no model registered
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert (
        lock["clean"] != before["clean"]
        and lock["tokenize"] == before["tokenize"]
        and not (project / "data" / "tokenizer").exists()
    )
    # the inputs were tracked by DVC and pushed to the default remote
    tracked = yaml.safe_load((project / "data" / "user" / "tickets.jsonl.dvc").read_text())["outs"][0]["md5"]
    assert all((project / "data" / "user" / "docs" / f"note{i}.md.dvc").exists() for i in range(40))
    md5s = {p.parent.name + p.name for p in (project / ".dvc-remote").rglob("*") if p.is_file()}
    assert tracked in md5s
    # clean scrubbed the PII and normalized the labels
    report = (project / "metrics" / "clean_report.md").read_text()
    assert "40 email" in report and "40 ip" in report
    import pandas as pd

    assert set(pd.read_parquet(project / "data" / "clean" / "labeled.parquet")["label"]) == {"hardware", "consumables"}
    # the MLflow ingest run names the inputs by their DVC hash
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(
        [client.get_experiment_by_name("lmforge").experiment_id], "tags.`lmforge.stage` = 'ingest'"
    )
    inputs = {i.dataset.name: i.dataset.digest for i in runs[0].inputs.dataset_inputs}
    assert inputs["labeled"] == tracked and len(inputs["corpus"]) == 32
    assert client.search_registered_models() == []

    # within the contract (25% >= 20%) the same data passes validate; ingest and clean stay cached
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["validate"]["min_class_share"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "validate"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "Stage 'clean' didn't change, skipping" in res.stdout
    assert json.loads((project / "data" / "validation" / "results.json").read_text())["success"] is True
    assert (project / "data" / "validation" / "data_docs" / "index.html").exists()
