"""Evaluate in the MLflow UI: one child run per model with flat metrics, tags and a predictions table, on a real
sqlite store; what evaluate's own run keeps."""

from __future__ import annotations

import pytest

from tasks.evaluate import (
    PREDICTION_TEXT_CHARS,
    PREDICTIONS_TABLE,
    log_models,
    model_kind,
    model_metrics,
    predictions_table,
    run_metrics,
)

VARIANTS = {"fp32", "int8", "onnx", "distilled-onnx-int8"}
FP32 = {
    "accuracy": 0.8,
    "accuracy_ci95": [0.75, 0.85],
    "macro_f1": 0.7,
    "macro_f1_ci95": [0.65, 0.74],
    "macro_f1_long": 0.6,
    "macro_f1_long_ci95": [0.5, 0.7],
    "macro_f1_short": None,
    "macro_f1_short_ci95": None,
    "p50_ms_b1": 3.5,
    "p50_ms_b32": 40.0,
    "size_mb": 2.5,
    "params": 1200,
    "behavioral": {"min_pass_rate": 0.9},
    "per_class_f1": {"json": 0.7},
    "pareto": True,
}
MAJORITY = {"accuracy": 0.2, "macro_f1": 0.05, "params": 0, "per_class_f1": {"json": 0.0}, "pareto": False}


def test_a_models_row_becomes_flat_metrics_with_interval_bounds_and_nothing_unmeasured():
    assert model_metrics(FP32) == {
        "accuracy": 0.8,
        "accuracy_low": 0.75,
        "accuracy_high": 0.85,
        "macro_f1": 0.7,
        "macro_f1_low": 0.65,
        "macro_f1_high": 0.74,
        "macro_f1_long": 0.6,
        "macro_f1_long_low": 0.5,
        "macro_f1_long_high": 0.7,
        "p50_ms_b1": 3.5,
        "p50_ms_b32": 40.0,
        "size_mb": 2.5,
        "params": 1200.0,
    }
    assert model_metrics(MAJORITY) == {"accuracy": 0.2, "macro_f1": 0.05, "params": 0.0}


def test_the_kind_of_a_model_is_its_format_or_baseline():
    kinds = {n: model_kind(n, VARIANTS) for n in [*sorted(VARIANTS), "cnn", "majority"]}
    assert kinds == {
        "distilled-onnx-int8": "onnx-int8",
        "fp32": "transformer",
        "int8": "int8",
        "onnx": "onnx",
        "cnn": "baseline",
        "majority": "baseline",
    }


def test_evaluates_own_run_logs_no_per_model_metrics():
    metrics = {
        "test_examples": 10,
        "variants": {"fp32": FP32},
        "baselines": {"majority": MAJORITY},
        "language_model": {"test_perplexity": 12.5},
        "artifacts": {"fp32": {"path": "x", "sha256": "y"}},
        "cost": {"wall_s": 3.0},
    }
    assert run_metrics(metrics) == {"test_examples": 10.0, "language_model.test_perplexity": 12.5, "cost.wall_s": 3.0}


def test_predictions_table_cuts_long_texts_and_keeps_one_row_per_text():
    table = predictions_table(["x" * (PREDICTION_TEXT_CHARS + 50), "short"], ["a", "b"], ["a", "a"], [0.91234, 0.5])
    assert table == {
        "text": ["x" * PREDICTION_TEXT_CHARS, "short"],
        "label": ["a", "b"],
        "prediction": ["a", "a"],
        "confidence": [0.9123, 0.5],
    }


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A real sqlite MLflow store under tmp_path, and an experiment in it."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("evaluate-runs", artifact_location=(tmp_path / "artifacts").as_uri())
    yield uri, experiment
    mlflow.set_tracking_uri(None)


def test_every_model_is_a_child_run_of_evaluate_with_its_metrics_tags_and_predictions(store):
    import mlflow
    from mlflow import MlflowClient
    from tasks.shared.tracking import MlflowTracker

    uri, experiment = store
    results = {"fp32": FP32, "majority": MAJORITY}
    texts, truth = ["def f(): pass", "import os"], ["a", "b"]
    tables = {
        "fp32": predictions_table(texts, truth, ["a", "a"], [0.9, 0.6]),
        "majority": predictions_table(texts, truth, ["a", "a"], [0.5, 0.5]),
    }
    with mlflow.start_run(experiment_id=experiment, run_name="evaluate") as parent:
        log_models(MlflowTracker(parent.info.run_id), results, {"fp32"}, tables)
        assert mlflow.active_run().info.run_id == parent.info.run_id  # the children are closed again

    client = MlflowClient(uri)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"fp32", "majority"}
    fp32, majority = by_name["fp32"], by_name["majority"]
    assert fp32.data.metrics == model_metrics(FP32) and majority.data.metrics == model_metrics(MAJORITY)
    assert {k: fp32.data.tags[k] for k in ("variant", "kind", "role", "pareto")} == {
        "variant": "fp32",
        "kind": "transformer",
        "role": "variant",
        "pareto": "true",
    }
    assert (majority.data.tags["kind"], majority.data.tags["role"]) == ("baseline", "baseline")
    assert all(r.info.status == "FINISHED" for r in children)
    table = client.load_table(experiment, PREDICTIONS_TABLE, run_ids=[fp32.info.run_id])
    logged = table.to_dict("list")
    assert logged.pop("confidence") == pytest.approx(tables["fp32"]["confidence"])
    assert logged == {k: v for k, v in tables["fp32"].items() if k != "confidence"}
    assert client.get_run(parent.info.run_id).data.metrics == {}  # evaluate's run holds no per-model copies
