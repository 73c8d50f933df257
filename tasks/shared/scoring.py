"""Scoring shared by evaluate, promote and the benchmarks: how a classifier is scored and timed.

A `Scorer` is a model as evaluate times it (`encode`, then `forward` to class probabilities).
`score_model` loads one and measures quality (accuracy, macro-F1, per-class F1, calibration),
throughput, size and the peak memory added; `timed` measures latency at batch 1 and 32 with the models
taking turns, so drift in the machine's speed falls on all of them alike. The evaluate stage scores
every variant with it, promotion scores the current champion again on the candidate's rows, and
bench/compression.py times the variants the same way.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from models.bundle import Bundle
from models.checkpoint import WEIGHTS, dir_size_mb
from models.onnx_runtime import GRAPH, graph_weights
from tasks.shared.config.evaluate import EvaluateConfig

ECE_BINS = 15


def scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class F1."""
    from sklearn.metrics import accuracy_score, f1_score

    per = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(y_true, y_pred)), 4),
        "macro_f1": round(float(np.mean(per)), 4),
        "per_class_f1": {lab: round(float(f), 4) for lab, f in zip(labels, per)},
    }


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the top-class confidence (equal-width bins) and the bins behind it."""
    conf, correct = probs.max(1), (probs.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if inside.any():
            acc, mean_conf, share = float(correct[inside].mean()), float(conf[inside].mean()), float(inside.mean())
            ece += share * abs(acc - mean_conf)
            rows.append(
                {
                    "lo": round(float(lo), 4),
                    "hi": round(float(hi), 4),
                    "accuracy": round(acc, 4),
                    "confidence": round(mean_conf, 4),
                    "count": int(inside.sum()),
                }
            )
    return round(ece, 4), rows


@dataclass
class Scorer:
    """A model as evaluate times it: `encode` (tokenization or vectorization) then `forward` (probabilities)."""

    labels: list[str]
    encode: Callable
    forward: Callable
    params: int = 0
    folder: Path | None = None

    def probabilities(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Class probabilities (N, K) of `texts` in their order, scored `batch_size` at a time shortest first: a
        batch is padded to its longest text, and texts of like length together pad little (the test split's
        fp32 classifier: 1.07 s instead of 1.44 s, the same predictions)."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        batches = [[texts[j] for j in order[i : i + batch_size]] for i in range(0, len(texts), batch_size)]
        out = np.concatenate([self.forward(self.encode(b)) for b in batches])
        probs = np.empty_like(out)
        probs[order] = out
        return probs

    def predict(self, texts: list[str], batch_size: int) -> list[str]:
        return [self.labels[i] for i in self.probabilities(texts, batch_size).argmax(1)]


def bundle_scorer(bundle: Bundle, folder: Path) -> Scorer:
    return Scorer(
        bundle.labels, bundle.encode, lambda enc: bundle.forward(*enc).numpy(), stored_weights(folder), Path(folder)
    )


def stored_weights(folder: Path) -> int:
    """Weights a model folder (safetensors or ONNX graph) stores (int8 counted like float; quantization scales and
    zero points not counted)."""
    from safetensors import safe_open

    if (Path(folder) / GRAPH).is_file() and not (Path(folder) / WEIGHTS).is_file():  # an `onnx` variant
        return graph_weights(Path(folder) / GRAPH)
    n = 0
    with safe_open(str(Path(folder) / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            if not key.endswith((".weight_scale", ".weight_zero_point")):
                n += int(np.prod(f.get_slice(key).get_shape()))
    return n


def percentile(times: list[float], q: float) -> float:
    return round(float(np.percentile(times, q)), 3)


def latency(
    scorers: dict[str, Scorer], texts: list[str], batch: int, reps: int, block: int = 8, suffix: str = ""
) -> dict[str, dict[str, float]]:
    """Per model: p50/p99 of whole requests of `batch` texts, and the median tokenization and forward time of each.

    The models take turns in blocks of `block` requests, each block after one untimed request, the order
    rotating every round: drift in the machine's speed while timing (a shared VM, another process) falls
    on every model alike, so their ratios stay fair, and no model is timed right after another's switch.
    """
    names = list(scorers)
    times: dict[str, tuple[list, list, list]] = {n: ([], [], []) for n in names}
    requests = [texts[(i * batch) % len(texts) :][:batch] for i in range(reps)]
    requests = [r if len(r) == batch or len(texts) < batch else texts[:batch] for r in requests]
    for start in range(0, reps, block):
        chunk = requests[start : start + block]
        for k in range(len(names)):
            name = names[(start // block + k) % len(names)]
            scorer = scorers[name]
            scorer.forward(scorer.encode(chunk[0]))  # untimed: the switch from the previous model
            total, tok, fwd = times[name]
            for b in chunk:
                t0 = time.perf_counter()
                enc = scorer.encode(b)
                t1 = time.perf_counter()
                scorer.forward(enc)
                t2 = time.perf_counter()
                total.append((t2 - t0) * 1e3)
                tok.append((t1 - t0) * 1e3)
                fwd.append((t2 - t1) * 1e3)
    s = f"b{batch}{suffix}"
    return {
        n: {
            f"p50_ms_{s}": percentile(total, 50),
            f"p99_ms_{s}": percentile(total, 99),
            f"tokenize_ms_{s}": percentile(tok, 50),
            f"forward_ms_{s}": percentile(fwd, 50),
        }
        for n, (total, tok, fwd) in times.items()
    }


class PeakRss:
    """Peak resident memory added inside the block, sampled every 2 ms (freed memory returned to the OS first)."""

    def __enter__(self):
        import threading

        import psutil

        gc.collect()
        _trim()
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def _trim() -> None:
    """Give freed heap back to the OS (glibc), so one model's peak is not hidden by the last one's free pages."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def score_model(load: Callable[[], Scorer], test: pd.DataFrame, cfg: EvaluateConfig) -> tuple[dict, np.ndarray, Scorer]:
    """Load one model and score it on the test split: quality, calibration, throughput, memory (latency: `timed`)."""
    texts, y_true = test["text"].tolist(), test["label"].tolist()
    with PeakRss() as mem:
        scorer = load()
        start = time.perf_counter()
        probs = scorer.probabilities(texts, cfg.batch_size)
        seconds = time.perf_counter() - start
    pred = [scorer.labels[i] for i in probs.argmax(1)]
    m = scores(y_true, pred, scorer.labels)
    index = {lab: i for i, lab in enumerate(scorer.labels)}
    m["ece"], m["reliability"] = calibration(probs, np.array([index.get(t, -1) for t in y_true]))
    m["throughput_per_s"] = round(len(texts) / seconds, 1)
    m["params"] = scorer.params
    m["peak_rss_mb"] = mem.added_mb
    if scorer.folder is not None:
        m["size_mb"] = round(dir_size_mb(scorer.folder), 3)
    return m, probs, scorer


def timed(
    scorers: dict[str, Scorer], texts: list[str], cfg: EvaluateConfig, long_texts: list[str] = ()
) -> dict[str, dict[str, float]]:
    """Batch-1 and batch-32 latency of every model, interleaved (see `latency`); with `long_texts` (the longest
    test functions) batch-1 latency on them too (`p50_ms_b1_long`, ...): what reading a whole function costs."""
    one = latency(scorers, texts, 1, cfg.latency_samples, block=8)
    many = latency(scorers, texts, 32, cfg.latency_batches, block=4)
    long = latency(scorers, list(long_texts), 1, cfg.latency_samples, block=8, suffix="_long") if long_texts else {}
    return {n: {**one[n], **many[n], **long.get(n, {})} for n in scorers}


def tfidf_scorer(train: pd.DataFrame, labels: list[str], cfg: EvaluateConfig) -> Scorer:
    """TF-IDF of word unigrams + logistic regression fitted on `train` (text, label): the lexical baseline."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(max_features=cfg.tfidf_max_features, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
    clf = LogisticRegression(C=cfg.tfidf_c, max_iter=2000).fit(vec.fit_transform(train["text"]), train["label"])
    order = [list(clf.classes_).index(lab) for lab in labels]
    return Scorer(
        labels, vec.transform, lambda X: clf.predict_proba(X)[:, order], int(clf.coef_.size + clf.intercept_.size)
    )
