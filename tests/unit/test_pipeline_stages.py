"""The stages' outputs on the tiny synthetic task (one shared run, see conftest.tiny_pipeline)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from sklearn.metrics import accuracy_score

from conftest import FILES_PER_SPLIT, FUNCTIONS_PER_FILE, LABELS, TINY_FINETUNE, TINY_PRETRAIN
from models import checkpoint as ckpt

N_PER_LABEL = {s: n * FUNCTIONS_PER_FILE for s, n in FILES_PER_SPLIT.items()}


def _in_unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


def test_clean_and_validate_ran_on_the_tiny_data(tiny_pipeline):
    assert tiny_pipeline.clean.labeled["output"] == len(LABELS) * sum(N_PER_LABEL.values())
    assert tiny_pipeline.clean.labeled["duplicates"] == 0
    assert tiny_pipeline.validate.success
    assert json.loads(tiny_pipeline.paths.validation.read_text())["success"] is True


def test_tokenize_outputs(tiny_pipeline):
    t = tiny_pipeline.tokenize
    assert t.vocab_size == 300 and t.train_tokens > 10 * t.val_tokens > 0


def test_pretrain_writes_model_and_curve(tiny_pipeline):
    lm_dir = tiny_pipeline.paths.lm
    assert {ckpt.WEIGHTS, ckpt.CONFIG, "loss_curve.png", "history.json"} == {p.name for p in lm_dir.iterdir()}
    assert (lm_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = tiny_pipeline.pretrain
    assert p.steps == TINY_PRETRAIN.max_steps
    assert math.isfinite(p.val_loss) and 0 < p.val_loss
    assert p.val_perplexity == pytest.approx(math.exp(p.val_loss), rel=1e-3)
    meta = ckpt.read_config(lm_dir)
    assert meta["kind"] == "gpt" and meta["config"]["vocab_size"] == 300 and meta["config"]["n_embd"] == 16
    assert meta["train_config"]["max_steps"] == TINY_PRETRAIN.max_steps
    history = json.loads((lm_dir / "history.json").read_text())
    assert [h["step"] for h in history if "val_loss" in h] == [0, 10, 19]
    # 20 steps already beat the untrained model's loss (about ln(320) = 5.77)
    first = next(h["train_loss"] for h in history if "train_loss" in h)
    assert p.final_train_loss < first - 0.2  # 16 seeds: drop of 0.5-0.6
    val = [h["val_loss"] for h in history if "val_loss" in h]
    assert val[-1] == pytest.approx(p.val_loss, abs=1e-4) and val[-1] < val[0] - 0.2


def test_finetune_metrics_and_outputs(tiny_pipeline):
    f = tiny_pipeline.finetune
    assert f.train_examples == len(LABELS) * N_PER_LABEL["train"]
    assert _in_unit(f.val_accuracy) and _in_unit(f.val_macro_f1)
    assert f.best_epoch in range(1, TINY_FINETUNE.epochs + 1)
    folder = tiny_pipeline.paths.classifier
    assert {p.name for p in folder.iterdir()} == {ckpt.WEIGHTS, ckpt.CONFIG, "history.json"}
    meta = ckpt.read_config(folder)
    assert meta["kind"] == "classifier" and meta["config"]["labels"] == LABELS
    assert meta["max_length"] == TINY_FINETUNE.max_length and meta["config"]["pooling"] == "mean"
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == TINY_FINETUNE.epochs
    assert f.val_macro_f1 == pytest.approx(max(h["val_macro_f1"] for h in history), abs=1e-4)


def test_finetune_trains_every_requested_baseline(tiny_pipeline):
    f = tiny_pipeline.finetune
    folder = tiny_pipeline.paths.baselines
    assert {p.name for p in folder.iterdir()} == {*TINY_FINETUNE.baselines, "summary.json", "validation_curves.png"}
    assert set(f.baselines) == set(TINY_FINETUNE.baselines)
    kinds = {"scratch": "classifier", "cnn": "classifier-cnn", "gru": "classifier-gru"}
    for name, m in f.baselines.items():
        assert {p.name for p in (folder / name).iterdir()} == {ckpt.WEIGHTS, ckpt.CONFIG, "history.json"}
        meta = ckpt.read_config(folder / name)
        assert meta["kind"] == kinds[name] and meta["config"]["labels"] == LABELS
        assert meta["max_length"] == TINY_FINETUNE.max_length
        history = json.loads((folder / name / "history.json").read_text())
        assert len(history) == m["epochs_run"] == TINY_FINETUNE.epochs  # no patience: every epoch runs
        assert m["val_macro_f1"] == pytest.approx(max(h["val_macro_f1"] for h in history), abs=1e-4)
        assert _in_unit(m["val_accuracy"]) and m["train_seconds"] > 0 and m["params"] > 0
    # the scratch baseline is the pretrained classifier's architecture, randomly initialised
    scratch = ckpt.read_config(folder / "scratch")["config"]
    assert scratch == ckpt.read_config(tiny_pipeline.paths.classifier)["config"]
    assert f.baselines["scratch"]["params"] == f.trainable_params


def test_compress_makes_a_smaller_int8_model(tiny_pipeline):
    z = tiny_pipeline.compress
    assert z.method == "dynamic-int8-per-channel"
    assert 0 < z.int8_size_mb < z.fp32_size_mb
    assert z.metrics["size_ratio"] < 1
    folder = tiny_pipeline.paths.compressed
    assert {p.name for p in folder.iterdir()} == {ckpt.WEIGHTS, ckpt.CONFIG}
    meta = ckpt.read_config(folder)
    assert meta["kind"] == "classifier-int8" and meta["per_channel"] is True
    assert meta["max_length"] == TINY_FINETUNE.max_length  # carried over from the float model


def test_evaluate_reports_variants_and_baselines(tiny_pipeline):
    e = tiny_pipeline.evaluate
    assert e.test_examples == len(LABELS) * N_PER_LABEL["test"]
    assert set(e.variants) == {"fp32", "int8"}
    assert set(e.baselines) == {"majority", "tfidf_logreg", *TINY_FINETUNE.baselines}
    for m in [*e.variants.values(), *e.baselines.values()]:
        assert _in_unit(m["accuracy"]) and _in_unit(m["macro_f1"])
    for m in [*e.variants.values(), e.baselines["tfidf_logreg"], *(e.baselines[b] for b in TINY_FINETUNE.baselines)]:
        assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"] and m["throughput_per_s"] > 0
    for name in TINY_FINETUNE.baselines:
        assert 0 < e.baselines[name]["size_mb"]
    assert e.variants["int8"]["size_mb"] < e.variants["fp32"]["size_mb"]
    # balanced classes: the majority baseline is exactly chance
    assert e.baselines["majority"]["accuracy"] == pytest.approx(1 / len(LABELS), abs=1e-4)


def test_evaluate_records_the_sha256_of_everything_it_scored(tiny_pipeline):
    from tasks.shared.digest import tree_sha256

    p, artifacts = tiny_pipeline.paths, tiny_pipeline.evaluate.artifacts
    expected = {"fp32": p.classifier, "int8": p.compressed, "tokenizer": p.tokenizer / "tokenizer.json", "labeled_data": p.clean_labeled}
    assert set(artifacts) == set(expected)
    for name, path in expected.items():
        assert artifacts[name] == {"path": str(path), "sha256": tree_sha256(path)}


def test_evaluate_writes_plots_and_predictions(tiny_pipeline):
    d = tiny_pipeline.paths.evaluation
    for png in ("confusion_matrix.png", "accuracy_vs_latency.png"):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    pred = pd.read_parquet(d / "predictions.parquet")
    assert len(pred) == tiny_pipeline.evaluate.test_examples
    assert set(pred["split"]) == {"test"}
    for name in ("fp32", "int8", "tfidf_logreg", *TINY_FINETUNE.baselines):
        assert set(pred[f"pred_{name}"]) <= set(LABELS)
        reported = {**tiny_pipeline.evaluate.variants, **tiny_pipeline.evaluate.baselines}[name]["accuracy"]
        assert accuracy_score(pred["label"], pred[f"pred_{name}"]) == pytest.approx(reported, abs=1e-4)


def test_models_learn_the_easy_task(tiny_pipeline):
    """Seeds 1330-1349 and 0-11 of this config all gave the tiny model >= 0.67 test accuracy (chance 0.33)."""
    e = tiny_pipeline.evaluate
    majority = e.baselines["majority"]["accuracy"]
    assert e.baselines["tfidf_logreg"]["accuracy"] >= majority + 0.5
    for name in ("fp32", "int8"):
        assert e.variants[name]["accuracy"] >= majority + 0.2, (name, e.variants[name])


def test_promotion_chooses_only_among_the_transformer_variants(tiny_pipeline):
    """Trained baselines are reported under `baselines`; promote picks from `variants` alone."""
    from tasks.shared.config.promote import PromoteConfig
    from tasks.ops.promote import choose_variant

    e = tiny_pipeline.evaluate.metrics
    assert not set(e["variants"]) & set(e["baselines"])
    assert choose_variant(PromoteConfig(variant="auto"), e["variants"]) in {"fp32", "int8"}
