"""Uncertainty of test scores and paired comparisons of two models on the same test rows.

Every test score lmforge shows comes with a 95% interval from a paired, seeded bootstrap over test rows:
one matrix of resampled row indices (`Resamples`) is drawn once per evaluation and every model is scored
on the same resamples, so the interval of a difference between two models is the interval of the
per-resample differences (Koehn 2004, "Statistical significance tests for machine translation
evaluation"; Efron & Tibshirani 1993, ch. 13: percentile intervals). Accuracy differences are also
tested with the exact McNemar test, a binomial test on the rows where exactly one of the two models is
right (McNemar 1947; Dietterich 1998 recommends it for comparing two classifiers on one test set).

The bootstrap counts per-class true positives, predictions and supports of all resamples at once with
`np.bincount` (1,000 resamples of 1,051 rows and 10 labels: a few milliseconds per model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
"""Bootstrap resamples of the test rows (evaluate.bootstrap_resamples)."""
LEVEL = 0.95
"""Confidence level of every interval shown (the `_ci95` keys)."""


@dataclass(frozen=True)
class Resamples:
    """`count` resamples (with replacement) of `rows` test rows, drawn from `seed`: shared by every model scored."""

    rows: int
    count: int = RESAMPLES
    seed: int = 1337

    def indices(self) -> np.ndarray:
        """(count, rows) row indices; the same for the same (rows, count, seed)."""
        return np.random.default_rng(self.seed).integers(0, self.rows, size=(self.count, self.rows))


def _codes(values, labels: list[str]) -> np.ndarray:
    """Label index of each value; a value outside `labels` gets len(labels) (counted, never averaged)."""
    index = {lab: i for i, lab in enumerate(labels)}
    return np.array([index.get(v, len(labels)) for v in values], dtype=np.int64)


def resampled_scores(y_true, y_pred, labels: list[str], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, macro-F1) of each resample in `idx`; macro-F1 over `labels` as `scoring.scores` computes it
    (F1 of a label with no prediction and no support is 0)."""
    k = len(labels) + 1
    t, p = _codes(y_true, labels)[idx], _codes(y_pred, labels)[idx]
    offset = np.arange(idx.shape[0])[:, None] * k
    n = idx.shape[0] * k
    hit = t == p
    support = np.bincount((t + offset).ravel(), minlength=n).reshape(-1, k)[:, :-1]
    predicted = np.bincount((p + offset).ravel(), minlength=n).reshape(-1, k)[:, :-1]
    tp = np.bincount((t + offset)[hit], minlength=n).reshape(-1, k)[:, :-1]
    denom = support + predicted
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
    return hit.mean(1), f1.mean(1)


def interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """The percentile interval [low, high] of bootstrap `samples`, rounded to 4 places."""
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [round(float(lo), 4), round(float(hi), 4)]


def score_intervals(y_true, y_pred, labels: list[str], resamples: Resamples) -> dict[str, list[float]]:
    """`accuracy_ci95` and `macro_f1_ci95` of one model's predictions."""
    acc, f1 = resampled_scores(y_true, y_pred, labels, resamples.indices())
    return {"accuracy_ci95": interval(acc), "macro_f1_ci95": interval(f1)}


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Exact McNemar test of `a` against `b` on the same rows (bool arrays: was each row right).

    `a_only`/`b_only`: rows only `a` (only `b`) got right. `p_a_worse`: one-sided p-value of "a is less
    accurate than b" (the binomial tail P(X <= a_only), X ~ Bin(a_only + b_only, 1/2)); `p_a_better` the other
    tail; `p_value` the two-sided one. With no discordant row every p-value is 1."""
    from scipy.stats import binomtest

    a_only = int(np.sum(a_correct & ~b_correct))
    b_only = int(np.sum(b_correct & ~a_correct))
    n = a_only + b_only
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_a_worse": 1.0, "p_a_better": 1.0, "p_value": 1.0}
    return {
        "a_only": a_only,
        "b_only": b_only,
        "p_a_worse": float(binomtest(a_only, n, 0.5, alternative="less").pvalue),
        "p_a_better": float(binomtest(a_only, n, 0.5, alternative="greater").pvalue),
        "p_value": float(binomtest(a_only, n, 0.5).pvalue),
    }


@dataclass
class Paired:
    """Model `a` against model `b` on the same test rows: differences a - b with their 95% intervals and p-values."""

    rows: int
    accuracy: tuple[float, float]
    """(a, b) accuracy on these rows."""
    macro_f1: tuple[float, float]
    """(a, b) macro-F1 on these rows (over the labels compared)."""
    accuracy_diff_ci95: list[float]
    macro_f1_diff_ci95: list[float]
    mcnemar: dict
    """`mcnemar_exact(a, b)`: the accuracy test."""
    p_f1_worse: float
    """Paired bootstrap, one-sided: share of resamples where a's macro-F1 is not below b's (small: a is worse)."""
    p_f1_better: float
    """Paired bootstrap, one-sided: share of resamples where a's macro-F1 is not above b's (small: a is better)."""
    churn: float
    """Share of rows whose predicted label differs between a and b."""

    @property
    def accuracy_diff(self) -> float:
        return round(self.accuracy[0] - self.accuracy[1], 4)

    @property
    def macro_f1_diff(self) -> float:
        return round(self.macro_f1[0] - self.macro_f1[1], 4)

    def worse(self, alpha: float) -> bool:
        """Is `a` significantly worse than `b` in macro-F1 (paired bootstrap) or accuracy (exact McNemar)?"""
        return self.p_worse < alpha

    def better(self, alpha: float) -> bool:
        """Is `a` significantly better than `b` in macro-F1 (paired bootstrap), and not worse in accuracy (McNemar)?"""
        return self.p_f1_better < alpha and self.mcnemar["p_a_worse"] >= alpha

    @property
    def p_worse(self) -> float:
        """The smaller of the two one-sided p-values of "a is worse" (macro-F1 bootstrap, accuracy McNemar)."""
        return min(self.p_f1_worse, self.mcnemar["p_a_worse"])

    def describe(self, a: str, b: str) -> str:
        """One line: both scores, the differences with their intervals and the p-values."""
        lo, hi = self.macro_f1_diff_ci95
        alo, ahi = self.accuracy_diff_ci95
        return (
            f"macro-F1 {self.macro_f1[0]:.4f} ({a}) vs {self.macro_f1[1]:.4f} ({b}), "
            f"difference {self.macro_f1_diff:+.4f} [95% CI {lo:+.4f}, {hi:+.4f}], "
            f"p(worse) {_p(self.p_f1_worse)} (paired bootstrap); "
            f"accuracy {self.accuracy[0]:.4f} vs {self.accuracy[1]:.4f}, "
            f"difference {self.accuracy_diff:+.4f} [95% CI {alo:+.4f}, {ahi:+.4f}], "
            f"p(worse) {_p(self.mcnemar['p_a_worse'])} (exact McNemar, {self.mcnemar['a_only']} vs "
            f"{self.mcnemar['b_only']} rows only one got right); {self.rows} rows"
        )

    @classmethod
    def from_dict(cls, d: dict) -> "Paired":
        """The comparison `as_dict` wrote (evaluate.json's `vs_baselines`)."""
        keep = {k: d[k] for k in cls.__dataclass_fields__}
        return cls(**keep | {"accuracy": tuple(d["accuracy"]), "macro_f1": tuple(d["macro_f1"])})

    def as_dict(self) -> dict:
        return {
            "rows": self.rows,
            "accuracy": list(self.accuracy),
            "macro_f1": list(self.macro_f1),
            "accuracy_diff": self.accuracy_diff,
            "accuracy_diff_ci95": self.accuracy_diff_ci95,
            "macro_f1_diff": self.macro_f1_diff,
            "macro_f1_diff_ci95": self.macro_f1_diff_ci95,
            "p_f1_worse": self.p_f1_worse,
            "p_f1_better": self.p_f1_better,
            "mcnemar": self.mcnemar,
            "churn": self.churn,
        }


def _p(p: float) -> str:
    return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def paired(y_true, pred_a, pred_b, labels: list[str], resamples: Resamples) -> Paired:
    """Compare predictions `pred_a` and `pred_b` of the same rows `y_true` (macro-F1 over `labels`)."""
    y_true, pred_a, pred_b = (np.asarray(list(x), dtype=object) for x in (y_true, pred_a, pred_b))
    if not len(y_true) == len(pred_a) == len(pred_b) == resamples.rows:
        raise ValueError(f"paired: {len(y_true)} rows, {len(pred_a)} and {len(pred_b)} predictions, {resamples.rows}")
    idx = resamples.indices()
    full = np.arange(len(y_true))[None, :]
    (acc_a,), (f1_a,) = resampled_scores(y_true, pred_a, labels, full)
    (acc_b,), (f1_b,) = resampled_scores(y_true, pred_b, labels, full)
    ra, fa = resampled_scores(y_true, pred_a, labels, idx)
    rb, fb = resampled_scores(y_true, pred_b, labels, idx)
    d = fa - fb
    return Paired(
        rows=len(y_true),
        accuracy=(round(float(acc_a), 4), round(float(acc_b), 4)),
        macro_f1=(round(float(f1_a), 4), round(float(f1_b), 4)),
        accuracy_diff_ci95=interval(ra - rb),
        macro_f1_diff_ci95=interval(d),
        mcnemar=mcnemar_exact(pred_a == y_true, pred_b == y_true),
        # (1 + count) / (1 + B): a bootstrap p-value is never 0 (Davison & Hinkley 1997, eq. 4.11)
        p_f1_worse=round(float((1 + np.sum(d >= 0)) / (1 + len(d))), 6),
        p_f1_better=round(float((1 + np.sum(d <= 0)) / (1 + len(d))), 6),
        churn=round(float(np.mean(pred_a != pred_b)), 4),
    )


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values (Holm 1979): reject every test whose adjusted p-value is
    below alpha and the chance of any false rejection in the family stays at most alpha."""
    adjusted, running, m = {}, 0.0, len(pvalues)
    for i, key in enumerate(sorted(pvalues, key=pvalues.get)):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        adjusted[key] = round(running, 6)
    return {k: adjusted[k] for k in pvalues}
