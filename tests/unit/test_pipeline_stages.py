"""The stages' outputs on the tiny synthetic task (one shared run, see conftest.tiny_pipeline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import FILES_PER_SPLIT, FUNCTIONS_PER_FILE, LABELS, TINY_FINETUNE, TINY_PRETRAIN
from sklearn.metrics import accuracy_score

from models import checkpoint as ckpt

N_PER_LABEL = {s: n * FUNCTIONS_PER_FILE for s, n in FILES_PER_SPLIT.items()}


def _in_unit(x: float) -> bool:
    return 0.0 <= x <= 1.0


def test_clean_and_validate_ran_on_the_tiny_data(tiny_pipeline):
    assert tiny_pipeline.clean.labeled["output_rows"] == len(LABELS) * sum(N_PER_LABEL.values())
    assert tiny_pipeline.clean.labeled["removed"]["duplicates"] == 0
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


VARIANTS = {"fp32", "pruned", "sparse", "distilled", "int8", "pruned-int8", "distilled-int8"}
"""What the default quantize.sources and the three compression stages build."""


def test_quantize_makes_a_smaller_int8_model_of_each_source(tiny_pipeline):
    q, p = tiny_pipeline.quantize, tiny_pipeline.paths
    assert q.backend == "torch.ao" and set(q.variants) == {"int8", "pruned-int8", "distilled-int8"}
    for name, v in q.variants.items():
        assert 0 < v["int8_size_mb"] < v["float_size_mb"]
        assert v["linear_weight_ratio"] > 3  # int8 + one float32 scale per row (tiny rows: below 4x)
        folder = p.quantized / name
        assert {x.name for x in folder.iterdir()} == {ckpt.WEIGHTS, ckpt.CONFIG}
        meta = ckpt.read_config(folder)
        assert meta["kind"] == "classifier-int8" and meta["per_channel"] is True and meta["backend"] == "torch.ao"
        assert meta["variant"] == name and meta["source"] == v["source"]
        assert meta["max_length"] == TINY_FINETUNE.max_length  # carried over from the float model


def test_prune_removes_heads_and_channels_physically(tiny_pipeline):
    from models.compression import count_params

    r, p = tiny_pipeline.prune, tiny_pipeline.paths
    fp32, pruned = ckpt.load_classifier(p.classifier), ckpt.load_classifier(p.pruned)
    trunk = pruned.config.trunk
    assert trunk.layer_heads == r.layer_heads and all(1 <= h < fp32.config.trunk.n_head for h in trunk.layer_heads)
    assert trunk.layer_ffn == r.layer_ffn and all(f < 4 * fp32.config.trunk.n_embd for f in trunk.layer_ffn)
    assert pruned.trunk.blocks[0].mlp.fc.weight.shape[0] == trunk.layer_ffn[0]  # smaller matrices, not masks
    assert count_params(pruned) == r.params_after < r.params_before == count_params(fp32)
    assert 0 < r.metrics["params_removed"] < 1
    assert 0 <= r.val_macro_f1_pruned <= 1 and 0 <= r.val_macro_f1_recovered <= 1


def test_sparsify_zeroes_the_smallest_weights_and_keeps_shapes(tiny_pipeline):
    from models.compression import sparsity

    r, p = tiny_pipeline.sparsify, tiny_pipeline.paths
    fp32, sparse = ckpt.load_classifier(p.sparse), ckpt.load_classifier(p.classifier)
    assert r.sparsity == pytest.approx(0.5, abs=0.01) and sparsity(ckpt.load_classifier(p.sparse)) == pytest.approx(
        r.sparsity, abs=1e-4
    )
    assert {k: v.shape for k, v in fp32.state_dict().items()} == {k: v.shape for k, v in sparse.state_dict().items()}
    assert "dense kernels" in r.speedup


def test_distill_builds_a_shallower_student_from_teacher_blocks(tiny_pipeline):
    r, p = tiny_pipeline.distill, tiny_pipeline.paths
    student = ckpt.load_classifier(p.distilled)
    assert student.config.trunk.n_layer == r.student_layers == 1 and r.copied_teacher_blocks == [1]
    assert r.student_params < r.teacher_params
    assert ckpt.read_config(p.distilled)["teacher_blocks"] == [1]


def test_evaluate_reports_variants_and_baselines(tiny_pipeline):
    e = tiny_pipeline.evaluate
    assert e.test_examples == len(LABELS) * N_PER_LABEL["test"]
    assert set(e.variants) == VARIANTS and not e.skipped_variants
    assert set(e.baselines) == {"majority", "tfidf_logreg", *TINY_FINETUNE.baselines}
    assert e.test_examples_long + e.test_examples_short == e.test_examples and e.long_tokens == 128
    for m in [*e.variants.values(), *e.baselines.values()]:
        assert _in_unit(m["accuracy"]) and _in_unit(m["macro_f1"])
        for part, n in (("long", e.test_examples_long), ("short", e.test_examples_short)):
            f1, ci = m[f"macro_f1_{part}"], m[f"macro_f1_{part}_ci95"]
            assert (f1 is None and ci is None) if n == 0 else (_in_unit(f1) and ci[0] <= f1 <= ci[1])
        assert "vs_short" not in m  # finetune trained no `short` baseline
    for m in [*e.variants.values(), e.baselines["tfidf_logreg"], *(e.baselines[b] for b in TINY_FINETUNE.baselines)]:
        assert (
            0 < m["p50_ms_b1"] <= m["p99_ms_b1"]
            and 0 < m["p50_ms_b32"] <= m["p99_ms_b32"]
            and m["throughput_per_s"] > 0
        )
        assert 0 < m["tokenize_ms_b1"] < m["p50_ms_b1"] * 2 and 0 < m["forward_ms_b1"]
        assert 0 <= m["ece"] <= 1 and set(m["per_class_f1"]) == set(LABELS) and m["params"] > 0
        assert m["macro_f1"] == pytest.approx(sum(m["per_class_f1"].values()) / len(LABELS), abs=1e-3)
    for m in e.variants.values():  # behavioral tests run on every promotable variant
        assert 0 <= m["behavioral_min_pass_rate"] <= 1 and set(m["behavioral"]["invariance"]) == {
            "whitespace",
            "blank_lines",
            "rename_identifiers",
        }
    for name in TINY_FINETUNE.baselines:
        assert 0 < e.baselines[name]["size_mb"]
    assert e.variants["int8"]["size_mb"] < e.variants["fp32"]["size_mb"]
    assert (
        e.variants["pruned"]["params"]
        < e.variants["fp32"]["params"]
        == e.variants["int8"]["params"]
        == e.variants["sparse"]["params"]
    )
    lm = e.language_model
    assert (
        lm["test_perplexity"] > 1
        and lm["unigram_test_perplexity"] > 1
        and lm["bigram_test_perplexity"] > 1
        and 0 < lm["bigram_lambda"] < 1
    )
    # balanced classes: the majority baseline is exactly chance
    assert e.baselines["majority"]["accuracy"] == pytest.approx(1 / len(LABELS), abs=1e-4)


def test_evaluate_records_the_sha256_of_everything_it_scored(tiny_pipeline):
    from tasks.shared.digest import tree_sha256

    p, artifacts = tiny_pipeline.paths, tiny_pipeline.evaluate.artifacts
    from tasks.shared.variants import folders

    expected = {
        **{v: folders(p)[v] for v in VARIANTS},
        "tokenizer": p.tokenizer / "tokenizer.json",
        "labeled_data": p.clean_labeled,
    }
    expected.update({b: p.baselines / b for b in TINY_FINETUNE.baselines})
    assert set(artifacts) == set(expected)
    for name, path in expected.items():
        assert artifacts[name] == {"path": str(path), "sha256": tree_sha256(path)}


def test_evaluate_writes_plots_and_predictions(tiny_pipeline):
    d = tiny_pipeline.paths.evaluation
    for png in ("pareto.png", "reliability.png", *(f"confusion_{v}.png" for v in VARIANTS)):
        assert (d / png).read_bytes()[:4] == b"\x89PNG"
    report = (d / "report.md").read_text()
    assert all(f"| {name} |" in report for name in [*VARIANTS, "tfidf_logreg", "majority"]) and "Pareto front" in report
    pred = pd.read_parquet(d / "predictions.parquet")
    assert len(pred) == tiny_pipeline.evaluate.test_examples
    assert (pred["tokens"] > 128).sum() == tiny_pipeline.evaluate.test_examples_long
    assert set(pred["split"]) == {"test"}
    for name in (*VARIANTS, "tfidf_logreg", *TINY_FINETUNE.baselines):
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
    from tasks.ops.promote import choose_variant
    from tasks.shared.config.promote import PromoteConfig

    e = tiny_pipeline.evaluate.metrics
    assert not set(e["variants"]) & set(e["baselines"])
    chosen, why = choose_variant(PromoteConfig(variant="auto"), e["variants"])
    assert chosen in VARIANTS and set(why) == set(e["variants"]) and why[chosen]


def test_ngram_yardsticks_match_counts_by_hand():
    from tasks.evaluate import NGram

    tokens = np.array([0, 1, 2, 0, 1, 1, 0, 2])  # vocab 4: token 3 never occurs
    g = NGram(tokens, vocab=4, lam=0.5)
    assert g.unigram.tolist() == pytest.approx([4 / 12, 4 / 12, 3 / 12, 1 / 12])  # add-one over 8 tokens
    # after 0: 1 twice, 2 once; after 1: 2, 1, 0; token 2 is never followed by 3; 3 is never a context
    assert g.bigram(np.array([0, 0, 1, 2, 3]), np.array([1, 2, 1, 3, 0])).tolist() == pytest.approx(
        [2 / 3, 1 / 3, 1 / 3, 0, 0]
    )
    uni, bi = g.nll(np.array([0, 3]), np.array([1, 0]))
    assert uni == pytest.approx(-math.log(4 / 12) - math.log(4 / 12))
    assert bi == pytest.approx(-math.log(0.5 * 2 / 3 + 0.5 * 4 / 12) - math.log(0.5 * 0 + 0.5 * 4 / 12))
    # fit picks the interpolation weight on the held-out tail: a stream that repeats one bigram wants it high
    assert NGram.fit(np.tile([5, 6], 500), vocab=8).lam == 0.99
