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

from models.bundle import Bundle, load_parts, load_tokenizer
from models.checkpoint import CONFIG, dir_size_mb, load_classifier, read_config, write_dir_atomically
from tasks.config import EvaluateConfig, Paths
from tasks.errors import UserError
from tasks.io import read_parquet
from tasks.plots import publish, pyplot
from tasks.tokenize import TOKENIZER_FILE
from tasks.tracking import NullTracker, Tracker, stage_main


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
    variants, preds = {}, {}
    for name, folder in (("fp32", paths.classifier), ("int8", paths.compressed)):
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

    def fill(d: Path) -> None:
        test.assign(**{f"pred_{k}": v for k, v in preds.items()}).to_parquet(d / "predictions.parquet", index=False)
        cm = plot_confusion(test["label"].tolist(), preds[best], labels, f"Confusion matrix ({best}, test split)", d / "confusion_matrix.png")
        tr = plot_tradeoff({**variants, **baselines}, d / "accuracy_vs_latency.png")  # majority has no latency: not drawn
        publish(tracker, cm, "confusion_matrix.png")
        publish(tracker, tr, "accuracy_vs_latency.png")

    write_dir_atomically(paths.evaluation, fill)
    return EvaluateResult(test_examples=len(test), variants=variants, baselines=baselines)


def main() -> None:
    stage_main("evaluate", lambda p, t: run(p.evaluate, p.paths, t).metrics)


if __name__ == "__main__":
    main()
