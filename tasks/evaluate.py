"""evaluate: every model variant and the baselines on the same held-out test split.

Reports accuracy, macro-F1, single-text latency (p50/p95), batch throughput and size of the fp32
and int8 Transformer classifiers, next to a majority-class baseline, a TF-IDF + logistic-regression
baseline and the baselines finetune trained (`paths.baselines`: scratch Transformer, CNN, GRU).
Only the variants are candidates for promotion. Plots: the confusion matrix of the best variant
and accuracy vs latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.bundle import Bundle, load_parts
from models.checkpoint import CONFIG, dir_size_mb, load_classifier, read_config
from models.tokenizer import TOKENIZER_FILE, load_tokenizer
from tasks.shared.config.base import Paths
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet, write_csv
from tasks.shared.plots import publish, pyplot
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"evaluate": EvaluateConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
CONFUSION_PLOT = "evaluate_confusion.csv"
PER_CLASS_PLOT = "evaluate_per_class.csv"
TRADEOFF_PLOT = "evaluate_accuracy_vs_latency.csv"
"""Plot data in `paths.plots` (dvc.yaml `plots:`): test predictions of the best variant, its per-class
scores, and every model's accuracy against its p50 latency."""


def scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)), 4),
    }


def latency_ms(predict_one, texts: list[str]) -> dict[str, float]:
    """p50/p95 wall time of single-text predictions, after two warm-up calls."""
    for t in texts[:2]:
        predict_one(t)
    times = []
    for t in texts:
        start = time.perf_counter()
        predict_one(t)
        times.append((time.perf_counter() - start) * 1e3)
    return {"latency_p50_ms": round(float(np.percentile(times, 50)), 3), "latency_p95_ms": round(float(np.percentile(times, 95)), 3)}


def evaluate_bundle(bundle: Bundle, test: pd.DataFrame, cfg: EvaluateConfig) -> tuple[dict, list[str]]:
    texts = test["text"].tolist()
    start = time.perf_counter()
    probs = bundle.probabilities(texts, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - start
    pred = [bundle.labels[i] for i in probs.argmax(-1).tolist()]
    m = scores(test["label"].tolist(), pred, bundle.labels)
    m.update(latency_ms(lambda t: bundle.probabilities([t]), texts[: cfg.latency_samples]))
    m["throughput_per_s"] = round(len(texts) / seconds, 1)
    return m, pred


def tfidf_baseline(train: pd.DataFrame, test: pd.DataFrame, labels: list[str], cfg: EvaluateConfig) -> tuple[dict, list[str]]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipe = make_pipeline(
        TfidfVectorizer(max_features=cfg.tfidf_max_features, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True),
        LogisticRegression(C=cfg.tfidf_c, max_iter=2000),
    )
    pipe.fit(train["text"], train["label"])
    start = time.perf_counter()
    pred = list(pipe.predict(test["text"]))
    seconds = time.perf_counter() - start
    m = scores(test["label"].tolist(), pred, labels)
    m.update(latency_ms(lambda t: pipe.predict([t]), test["text"].tolist()[: cfg.latency_samples]))
    m["throughput_per_s"] = round(len(test) / seconds, 1)
    return m, pred


def plot_confusion(y_true: list[str], y_pred: list[str], labels: list[str], title: str, path: Path):
    plt = pyplot()
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(8, 7))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=labels, normalize="true", ax=ax, colorbar=False, values_format=".2f")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_tradeoff(results: dict[str, dict], path: Path):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in results.items():
        if "latency_p50_ms" in m:
            ax.scatter(m["latency_p50_ms"], m["accuracy"], s=60)
            ax.annotate(name, (m["latency_p50_ms"], m["accuracy"]), textcoords="offset points", xytext=(6, 4))
    ax.set_xscale("log")
    ax.set_xlabel("p50 latency per text (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def per_class(y_true: list[str], y_pred: list[str], labels: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of every label."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return [
        {"label": lab, "precision": round(float(a), 4), "recall": round(float(b), 4), "f1": round(float(c), 4), "support": int(d)}
        for lab, a, b, c, d in zip(labels, p, r, f, n)
    ]


def write_plot_data(y_true: list[str], y_pred: list[str], labels: list[str], results: dict[str, dict], folder: Path) -> None:
    """CSV plot data for `dvc plots`: confusion (actual, predicted), per-class scores, accuracy vs latency."""
    folder = Path(folder)
    write_csv(folder / CONFUSION_PLOT, ({"actual": a, "predicted": p} for a, p in zip(y_true, y_pred)), ["actual", "predicted"])
    write_csv(folder / PER_CLASS_PLOT, per_class(y_true, y_pred, labels), ["label", "precision", "recall", "f1", "support"])
    points = [{"model": name, **m} for name, m in results.items() if "latency_p50_ms" in m]
    write_csv(folder / TRADEOFF_PLOT, points, ["model", "latency_p50_ms", "accuracy", "macro_f1"])


def trained_baselines(folder: Path) -> dict[str, Path]:
    """Baseline model folders written by finetune (`<folder>/<name>/config.json`), by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {d.name: d for d in sorted(folder.iterdir()) if (d / CONFIG).is_file()}


def load_baseline(tokenizer_file: Path, folder: Path) -> Bundle:
    """A Bundle around a baseline classifier (any kind load_classifier knows)."""
    meta = read_config(folder)
    return Bundle(load_tokenizer(tokenizer_file), load_classifier(folder), list(meta["config"]["labels"]), int(meta["max_length"]))


@dataclass
class EvaluateResult:
    test_examples: int
    variants: dict[str, dict]
    baselines: dict[str, dict]
    artifacts: dict[str, dict]
    """What was scored, by path and sha256 (tasks.shared.digest.tree_sha256): the variants, the
    tokenizer and the labeled data. Promotion registers a variant only if its hashes still match."""

    @property
    def metrics(self) -> dict:
        return self.__dict__.copy()


def run(cfg: EvaluateConfig, paths: Paths, tracker: Tracker | None = None) -> EvaluateResult:
    tracker = tracker or NullTracker()
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    train, test = data[data["split"] == "train"], data[data["split"] == "test"]
    if test.empty:
        raise UserError(f"{paths.clean_labeled}: no test rows")
    tokenizer = Path(paths.tokenizer) / TOKENIZER_FILE
    artifacts = {name: {"path": str(f), "sha256": tree_sha256(f)} for name, f in (("tokenizer", tokenizer), ("labeled_data", paths.clean_labeled))}
    variants, preds = {}, {}
    for name, folder in (("fp32", paths.classifier), ("int8", paths.compressed)):
        artifacts[name] = {"path": str(folder), "sha256": tree_sha256(folder)}  # hashed before loading: a change after is caught
        bundle = load_parts(tokenizer, folder)
        variants[name], preds[name] = evaluate_bundle(bundle, test, cfg)
        variants[name]["size_mb"] = round(dir_size_mb(folder), 3)
        print(f"{name}: {variants[name]}")
    labels = bundle.labels
    majority = train["label"].value_counts().idxmax()
    baselines = {"majority": scores(test["label"].tolist(), [majority] * len(test), labels)}
    baselines["tfidf_logreg"], preds["tfidf_logreg"] = tfidf_baseline(train, test, labels, cfg)
    for name, folder in trained_baselines(paths.baselines).items():
        baselines[name], preds[name] = evaluate_bundle(load_baseline(tokenizer, folder), test, cfg)
        baselines[name]["size_mb"] = round(dir_size_mb(folder), 3)
    print(f"baselines: {baselines}")

    best = max(variants, key=lambda v: variants[v]["macro_f1"])

    with atomic_dir(paths.evaluation) as d:
        test.assign(**{f"pred_{k}": v for k, v in preds.items()}).to_parquet(d / "predictions.parquet", index=False)
        cm = plot_confusion(test["label"].tolist(), preds[best], labels, f"Confusion matrix ({best}, test split)", d / "confusion_matrix.png")
        tr = plot_tradeoff({**variants, **baselines}, d / "accuracy_vs_latency.png")  # majority has no latency: not drawn
        publish(tracker, cm, "confusion_matrix.png")
        publish(tracker, tr, "accuracy_vs_latency.png")
    write_plot_data(test["label"].tolist(), preds[best], labels, {**variants, **baselines}, paths.plots)
    return EvaluateResult(test_examples=len(test), variants=variants, baselines=baselines, artifacts=artifacts)


def main() -> None:
    stage_main("evaluate", lambda p, t: run(p.evaluate, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
