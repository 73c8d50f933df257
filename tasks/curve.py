"""curve: where pretraining pays. Test scores against labeled examples per label, pretrained vs from scratch.

For each k in `curve.per_label` (0 = every training example) and each seed, a seeded sample of k training
examples per label trains four models, each scored on the same, whole test split: the pretrained
Transformer (a head on paths.lm, finetune's recipe), the same Transformer from scratch (finetune's
`scratch`), the CNN baseline (its recipe) and TF-IDF + logistic regression (evaluate's). With few examples an
epoch is a handful of steps, so a neural run passes over its sample several times per epoch until the epochs
add up to `curve.min_steps` optimizer steps; the best epoch is chosen on k validation examples per label
(`cap_validation`), as scarce as the training labels.

Every mean over seeds carries a 95% interval from the paired bootstrap over test rows (tasks/shared/stats.py):
one matrix of resampled rows for every model, k and seed, each seed scored on every resample and the seeds'
scores averaged per resample. Per k, the pretrained model's lead over each other model has its interval and
the one-sided p-value of "no better". Outputs: metrics/curve.json, plot data for `dvc plots` and, in
paths.curve, every run's test predictions and the chart with its interval bands (logged to MLflow too).

Not part of the default pipeline: curve/dvc.yaml runs it (`make curve`, `dvc repro curve/dvc.yaml`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.checkpoint import load_lm
from models.transformer import GPT
from tasks.shared.classifiers import baseline_recipe, build_baseline, pretrained_classifier
from tasks.shared.classify import Examples, cap_per_label, encoder, fit, predict, read_labeled, split_rows
from tasks.shared.config.base import Paths
from tasks.shared.config.curve import CurveConfig
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.runtime import Runtime, device_name, setup_runtime
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, write_csv
from tasks.shared.plots import publish, pyplot
from tasks.shared.scoring import tfidf_scorer
from tasks.shared.stats import LEVEL, Resamples, interval, resampled_scores
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed

SECTIONS = {"curve": CurveConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`): finetune's recipe and evaluate's TF-IDF."""
PLOT = "curve_macro_f1.csv"
"""Mean test macro-F1 per model against examples per label, in `paths.plots` (curve/dvc.yaml `plots:`)."""
FIGURE = "curve_macro_f1.png"
"""The same curves with their 95% interval bands, in `paths.curve` and the stage's MLflow run."""
PREDICTIONS = "predictions.parquet"
"""Every run's test predictions (model, k, seed, row, label), in `paths.curve`."""


def k_name(k: int) -> str:
    """The key of k examples per label in curve.json: the number, or `all` for 0."""
    return str(k) if k else "all"


@dataclass
class Splits:
    """The labeled data, encoded once: runs take their samples from it by row position."""

    labels: list[str]
    train_rows: pd.DataFrame
    train: Examples
    val_rows: pd.DataFrame
    val: Examples
    test_labels: list[str]
    test: Examples
    test_texts: list[str]


def load_splits(paths: Paths, max_length: int) -> Splits:
    labels, data = read_labeled(paths)
    rows = {split: split_rows(data, split, labels, paths) for split in ("train", "val", "test")}
    encode = encoder(paths, labels, max_length)
    return Splits(
        labels,
        rows["train"],
        encode(rows["train"]),
        rows["val"],
        encode(rows["val"]),
        rows["test"]["label"].tolist(),
        encode(rows["test"]),
        rows["test"]["text"].tolist(),
    )


def sample(rows: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Positions of a seeded sample of `k` rows per label (0: all rows)."""
    return cap_per_label(rows, k, seed).index.to_numpy()


def repeats(examples: int, batch_size: int, epochs: int, min_steps: int) -> int:
    """Passes over a sample per epoch, so that `epochs` epochs take at least `min_steps` optimizer steps."""
    return max(1, math.ceil(min_steps * batch_size / (epochs * examples)))


@dataclass
class Setup:
    """What every run of the curve shares: the data, the pretrained LM, the runtime and the three sections."""

    splits: Splits
    lm: GPT
    rt: Runtime
    cfg: CurveConfig
    ft: FinetuneConfig
    ev: EvaluateConfig


@dataclass
class Run:
    """One model trained on one sample and scored on the test split."""

    model: str
    k: int
    seed: int
    examples: int
    steps: int
    seconds: float
    pred: list[str]
    accuracy: float
    macro_f1: float


def train_neural(name: str, k: int, seed: int, setup: Setup) -> tuple[list[str], int]:
    """Train `name` (pretrained, scratch or cnn) on k examples per label with `seed`; test predictions and steps."""
    s, lm, rt, cfg = setup.splits, setup.lm, setup.rt, setup.cfg
    ft = setup.ft.model_copy(update={"seed": seed})
    if name == "pretrained":
        model, scales, _ = pretrained_classifier(lm, s.labels, ft)
        recipe, epochs, lr_key = ft, ft.epochs, "finetune.lr"
    else:
        recipe, epochs, lr_key = baseline_recipe(name, ft)
        model, scales = build_baseline(name, recipe, lm, s.labels)
    rows = sample(s.train_rows, k, seed)
    rows = np.tile(rows, repeats(len(rows), recipe.batch_size, epochs, cfg.min_steps))
    val = s.val.take(sample(s.val_rows, k if cfg.cap_validation else 0, seed))
    label = f"curve {name} k={k_name(k)} seed={seed}"
    train = s.train.take(rows)
    trained = fit(label, model, recipe, train, val, len(s.labels), rt, NullTracker(), epochs, scales, lr_key=lr_key)
    pred = predict(trained.model.to(rt.device), s.test, rt)
    trained.model.to("cpu")
    return [s.labels[i] for i in pred], math.ceil(len(rows) / recipe.batch_size) * trained.epochs_run


def train_tfidf(k: int, seed: int, setup: Setup) -> list[str]:
    """TF-IDF + logistic regression on k examples per label: test predictions."""
    s = setup.splits
    scorer = tfidf_scorer(s.train_rows.iloc[sample(s.train_rows, k, seed)], s.labels, setup.ev)
    return scorer.predict(s.test_texts, setup.ev.batch_size)


def one_run(name: str, k: int, seed: int, setup: Setup) -> Run:
    """Train and score one model on one sample, and print its progress line."""
    s = setup.splits
    start = time.perf_counter()
    if name == "tfidf":
        pred, steps = train_tfidf(k, seed, setup), 0
    else:
        pred, steps = train_neural(name, k, seed, setup)
    seconds = time.perf_counter() - start
    (acc,), (f1,) = resampled_scores(s.test_labels, pred, s.labels, np.arange(len(pred))[None, :])
    run = Run(name, k, seed, len(sample(s.train_rows, k, seed)), steps, seconds, pred, float(acc), float(f1))
    print(
        f"curve: {name} k={k_name(k)} seed={seed}: test macro-F1 {f1:.4f}, accuracy {acc:.4f} "
        f"({run.examples} examples, {steps} steps, {run.seconds:.1f} s)",
        flush=True,
    )
    return run


def seed_entry(r: Run) -> dict:
    return {
        "seed": r.seed,
        "macro_f1": round(r.macro_f1, 4),
        "accuracy": round(r.accuracy, 4),
        "examples": r.examples,
        "steps": r.steps,
        "seconds": round(r.seconds, 1),
    }


def summarize(runs: list[Run], s: Splits, cfg: CurveConfig) -> tuple[dict, dict]:
    """Per model and k: mean over seeds with 95% intervals and per-seed values; per k: pretrained - each other."""
    idx = Resamples(len(s.test_labels), cfg.bootstrap_resamples, cfg.seed).indices()
    curves: dict[str, dict] = {}
    boot: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for name in cfg.models:
        curves[name] = {}
        for k in cfg.per_label:
            mine = [r for r in runs if r.model == name and r.k == k]
            resampled = [resampled_scores(s.test_labels, r.pred, s.labels, idx) for r in mine]
            acc, f1 = (np.mean([x[i] for x in resampled], axis=0) for i in (0, 1))
            boot[name, k] = acc, f1
            curves[name][k_name(k)] = {
                "examples_per_label": round(float(np.mean([r.examples for r in mine])) / len(s.labels), 1),
                "macro_f1": round(float(np.mean([r.macro_f1 for r in mine])), 4),
                "macro_f1_ci95": interval(f1),
                "accuracy": round(float(np.mean([r.accuracy for r in mine])), 4),
                "accuracy_ci95": interval(acc),
                "seeds": [seed_entry(r) for r in mine],
            }
    return curves, differences(curves, boot, cfg)


def differences(curves: dict, boot: dict, cfg: CurveConfig) -> dict:
    """Per k and other model: the pretrained model's lead in macro-F1 and accuracy, with its 95% interval and
    the one-sided paired-bootstrap p-value of "pretrained is no better" ((1 + #resamples with lead <= 0) / (1 + B))."""
    out: dict[str, dict] = {}
    for k in cfg.per_label:
        key = k_name(k)
        out[key] = {}
        for other in (m for m in cfg.models if m != "pretrained"):
            entry = {}
            for i, metric in enumerate(("accuracy", "macro_f1")):
                d = boot["pretrained", k][i] - boot[other, k][i]
                entry[f"{metric}_diff"] = round(curves["pretrained"][key][metric] - curves[other][key][metric], 4)
                entry[f"{metric}_diff_ci95"] = interval(d)
                entry[f"{metric}_p_not_better"] = round(float((1 + np.sum(d <= 0)) / (1 + len(d))), 6)
            out[key][other] = entry
    return out


def x_axis(curves: dict, cfg: CurveConfig) -> list[tuple[int, float]]:
    """(k, where it lies on the x axis) in increasing order: k itself, or the mean examples per label for `all`."""
    first = curves[cfg.models[0]]
    return sorted(((k, float(k or first[k_name(k)]["examples_per_label"])) for k in cfg.per_label), key=lambda p: p[1])


def plot_rows(curves: dict, cfg: CurveConfig) -> list[dict]:
    """One CSV row per k: examples per label and each model's mean macro-F1."""
    return [
        {"examples_per_label": x, **{m: curves[m][k_name(k)]["macro_f1"] for m in cfg.models}}
        for k, x in x_axis(curves, cfg)
    ]


def chart(curves: dict, cfg: CurveConfig, path: Path):
    """Mean test macro-F1 against examples per label (log scale), one line per model with its interval band."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    ks, xs = zip(*x_axis(curves, cfg))
    for name in cfg.models:
        entries = [curves[name][k_name(k)] for k in ks]
        ax.plot(xs, [e["macro_f1"] for e in entries], "o-", label=name)
        lows, highs = zip(*(e["macro_f1_ci95"] for e in entries))
        ax.fill_between(xs, lows, highs, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{k}" if k else f"all\n({x:g})" for k, x in zip(ks, xs)])
    ax.minorticks_off()
    ax.set_xlabel("training examples per label")
    ax.set_ylabel("test macro-F1")
    ax.set_title(f"Learning curve: mean of {len(cfg.seeds)} seeds, {LEVEL:.0%} paired-bootstrap bands")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def write_outputs(runs: list[Run], curves: dict, cfg: CurveConfig, paths: Paths, tracker: Tracker) -> None:
    """The plot data, and paths.curve: every run's test predictions and the chart (also logged to MLflow)."""
    write_csv(Path(paths.plots) / PLOT, plot_rows(curves, cfg), ["examples_per_label", *cfg.models])
    with atomic_dir(paths.curve) as d:
        preds = pd.DataFrame(
            [(r.model, k_name(r.k), r.seed, i, p) for r in runs for i, p in enumerate(r.pred)],
            columns=["model", "per_label", "seed", "row", "label"],
        )
        preds.to_parquet(d / PREDICTIONS, index=False)
        publish(tracker, chart(curves, cfg, d / FIGURE), FIGURE)


def run(cfg: CurveConfig, ft: FinetuneConfig, ev: EvaluateConfig, paths: Paths, tracker: Tracker | None = None) -> dict:
    """Train every model on every k and seed, score them on the test split; returns curve.json's content."""
    tracker = tracker or NullTracker()
    require_passed(paths.validation)
    lm = load_lm(paths.lm)
    splits = load_splits(paths, ft.max_length)
    rt = setup_runtime(ft)
    tracker.log_params({"device": device_name(rt.device)})
    setup = Setup(splits, lm, rt, cfg, ft, ev)
    runs = []
    for k in cfg.per_label:
        for step, seed in enumerate(cfg.seeds):
            for name in cfg.models:
                runs.append(one_run(name, k, seed, setup))
                tracker.log_metrics({f"{name}/{k_name(k)}/test_macro_f1": runs[-1].macro_f1}, step=step)
    curves, diffs = summarize(runs, splits, cfg)
    write_outputs(runs, curves, cfg, paths, tracker)
    return {
        "labels": len(splits.labels),
        "test_rows": len(splits.test_labels),
        "seeds": list(cfg.seeds),
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.seed, "level": LEVEL},
        "device": device_name(rt.device),
        "models": curves,
        "pretrained_vs": diffs,
    }


def main() -> None:
    stage_main("curve", lambda p, t: run(p.curve, p.finetune, p.evaluate, p.paths, t), SECTIONS)


if __name__ == "__main__":
    main()
