"""Your own labeled spans through the real flow: `ingest.spans` pointed at a JSONL file (the shape annotation tools
such as Doccano export) trains, evaluates, builds the graph of and registers an extractor of your labels, on the
pretrained trunk of the session's reference run; a bad row stops ingest in one line naming the file and row."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import LMFORGE, copy_tiny_run, update_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Donald Knuth"]
ORGS = ["Acme Corp", "Initech", "Globex", "Umbrella Labs", "Hooli"]
CITIES = ["Paris", "Oslo", "Lima", "Kyoto", "Quito"]


def _row(i: int) -> dict:
    """`<person> works for <org> in <city>.`: three spans, two relations (works_for, based_in)."""
    person, org, city = PEOPLE[i % len(PEOPLE)], ORGS[i % len(ORGS)], CITIES[i % len(CITIES)]
    text = f"Report {i}: {person} works for {org} in {city}."
    spans = []
    for value, label in ((person, "PERSON"), (org, "ORG"), (city, "CITY")):
        start = text.index(value)
        spans.append({"start": start, "end": start + len(value), "label": label})
    return {
        "text": text,
        "entities": spans,
        "relations": [{"head": 0, "tail": 1, "label": "works_for"}, {"head": 1, "tail": 2, "label": "based_in"}],
    }


@pytest.fixture(scope="module")
def project(tiny_flow_run, tmp_path_factory):
    folder, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("kg-user"))
    user = folder / "data" / "user"
    user.mkdir(parents=True, exist_ok=True)
    (user / "spans.jsonl").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(120)))
    update_params(folder, {"ingest": {"spans": "data/user/spans.jsonl"}, "tasks": {"enabled": ["kg"]}})
    return folder, env


def _pipeline(folder, env) -> subprocess.CompletedProcess:
    return subprocess.run([LMFORGE, "pipeline"], cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def test_user_spans_train_and_register_an_extractor_of_their_labels(project):
    from mlflow import MlflowClient

    folder, env = project
    res = _pipeline(folder, env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "Task run 'finetune'" not in out  # tasks.enabled: [kg] runs the shared stages and the kg ones only
    metrics = json.loads((folder / "metrics" / "extract.json").read_text())
    assert metrics["test_docs"] > 0 and metrics["entity_f1"] is not None
    assert metrics["linking_accuracy"] is None  # no knowledge base to link into: not scored, not gated
    assert set(metrics["per_type"]["entities"]["model"]) <= {"PERSON", "ORG", "CITY"}
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("lmforge-extractor", "candidate")
    assert str(mv.version) == "2"  # v1: the reference run's stdlib extractor
    from models.extractor import load_extractor

    extractor = load_extractor(folder / "data" / "models" / "extractor")
    assert set(extractor.entity_labels) == {"PERSON", "ORG", "CITY"}
    assert {"works_for", "based_in"} <= set(extractor.relation_labels)


def test_a_bad_span_row_stops_ingest_in_one_line_naming_file_and_row(project, tmp_path):
    folder, env = project
    bad = folder / "data" / "user" / "bad.jsonl"
    rows = [_row(0), {**_row(1), "entities": [{"start": 5, "end": 500, "label": "PERSON"}], "relations": []}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    update_params(folder, {"ingest": {"spans": "data/user/bad.jsonl"}})
    res = _pipeline(folder, env)
    assert res.returncode == 2
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "data/user/bad.jsonl" in line]
    assert errors and "row 2" in errors[-1] and "500" in errors[-1], errors
