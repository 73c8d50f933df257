"""Your own pairs through the real flow: `ingest.pairs` pointed at a JSONL file with your column names trains,
indexes, evaluates and registers an encoder of your pairs, on the pretrained trunk of the session's reference run;
a bad row stops ingest in one line naming the file and row."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import LMFORGE, copy_tiny_run, update_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VERBS = ["parse", "render", "validate", "encode", "decode", "merge", "split", "sort"]
THINGS = ["header", "message", "address", "cookie", "payload", "element", "token", "timestamp", "path", "query"]


def _row(i: int) -> dict:
    """A question and the function that answers it, in columns named as a user's export might name them."""
    verb, thing = VERBS[i % len(VERBS)], THINGS[(i // len(VERBS)) % len(THINGS)]
    return {
        "question": f"How do I {verb} a {thing} (case {i})?",
        "answer_code": f"def {verb}_{thing}_{i}(value):\n    return {verb}({thing}=value, case={i})",
        "uid": f"q{i}",
    }


@pytest.fixture(scope="module")
def project(tiny_flow_run, tmp_path_factory):
    folder, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("align-user"))
    user = folder / "data" / "user"
    user.mkdir(parents=True, exist_ok=True)
    (user / "pairs.jsonl").write_text("".join(json.dumps(_row(i)) + "\n" for i in range(80)))
    columns = {"text": "question", "code": "answer_code"}
    ingest = {"pairs": "data/user/pairs.jsonl", "pair_columns": columns, "id_column": "uid"}
    update_params(folder, {"ingest": ingest, "tasks": {"enabled": ["align"]}})
    return folder, env


def _pipeline(folder, env) -> subprocess.CompletedProcess:
    return subprocess.run([LMFORGE, "pipeline"], cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def test_user_pairs_train_index_and_register_an_encoder(project):
    from mlflow import MlflowClient

    folder, env = project
    res = _pipeline(folder, env)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert "Task run 'finetune'" not in out and "Task run 'kg_train'" not in out  # tasks.enabled: [align]
    metrics = json.loads((folder / "metrics" / "align.json").read_text())
    assert metrics["queries"] > 0 and metrics["pool"] >= metrics["queries"]
    assert 0 <= metrics["bm25_mrr"] <= 1 and metrics["served_mode"] in ("dense", "bm25", "hybrid")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("lmforge-encoder", "candidate")
    assert str(mv.version) == "2"  # v1: the reference run's stdlib encoder
    from models.search_index import SearchIndex

    index = SearchIndex.load(folder / "data" / "align" / "index")
    assert set(index.items["id"]) <= {f"q{i}" for i in range(80)} and len(index.items) == 80


def test_a_bad_pair_row_stops_ingest_in_one_line_naming_file_and_row(project):
    folder, env = project
    bad = folder / "data" / "user" / "bad.jsonl"
    rows = [_row(0), {**_row(1), "answer_code": "   "}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    update_params(folder, {"ingest": {"pairs": "data/user/bad.jsonl"}})
    res = _pipeline(folder, env)
    assert res.returncode == 2
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "data/user/bad.jsonl" in line]
    assert errors and "row 2" in errors[-1] and "answer_code" in errors[-1], errors
