"""tasks/shared/stats.py: bootstrap intervals, the exact McNemar test, paired comparisons and Holm's correction,
checked against scikit-learn, SciPy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tasks.shared.scoring import scores
from tasks.shared.stats import Paired, Resamples, holm, mcnemar_exact, paired, resampled_scores, score_intervals

LABELS = ["a", "b", "c", "d"]


def _data(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.choice(LABELS, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.choice(LABELS + ["zzz"], n))  # an unknown label among the errors
    return y.tolist(), pred.tolist()


def test_every_resample_is_scored_as_scikit_learn_scores_it():
    y, pred = _data()
    idx = Resamples(len(y), 1000, seed=5).indices()
    acc, f1 = resampled_scores(y, pred, LABELS, idx[:25])
    for k in range(25):
        yt, yp = [y[i] for i in idx[k]], [pred[i] for i in idx[k]]
        assert acc[k] == pytest.approx(accuracy_score(yt, yp))
        assert f1[k] == pytest.approx(f1_score(yt, yp, labels=LABELS, average="macro", zero_division=0))


def test_intervals_hold_the_score_and_narrow_with_more_rows():
    y, pred = _data(200)
    ci = score_intervals(y, pred, LABELS, Resamples(len(y)))
    full = scores(y, pred, LABELS)
    assert ci["accuracy_ci95"][0] < full["accuracy"] < ci["accuracy_ci95"][1]
    assert ci["macro_f1_ci95"][0] < full["macro_f1"] < ci["macro_f1_ci95"][1]
    y4, pred4 = _data(3200)
    wide = ci["accuracy_ci95"][1] - ci["accuracy_ci95"][0]
    narrow = np.diff(score_intervals(y4, pred4, LABELS, Resamples(len(y4)))["accuracy_ci95"])[0]
    assert narrow < wide / 2.5  # the width shrinks like 1/sqrt(rows): 16x rows, ~4x narrower


def test_resamples_are_seeded():
    assert (Resamples(50, 1000, 7).indices() == Resamples(50, 1000, 7).indices()).all()
    assert (Resamples(50, 1000, 7).indices() != Resamples(50, 1000, 8).indices()).any()


def test_mcnemar_exact_matches_the_binomial_tail():
    a = np.array([True] * 10 + [False] * 15 + [True] * 50)  # a alone right on 10 rows
    b = np.array([False] * 10 + [True] * 15 + [True] * 50)  # b alone right on 15 rows
    m = mcnemar_exact(a, b)
    assert (m["a_only"], m["b_only"]) == (10, 15)
    # P(X <= 10), X ~ Bin(25, 1/2) = 0.2122 (sum of C(25, k) for k <= 10, over 2^25)
    assert m["p_a_worse"] == pytest.approx(sum(math.comb(25, k) for k in range(11)) / 2**25)
    assert m["p_value"] == pytest.approx(min(1.0, 2 * m["p_a_worse"]))
    assert mcnemar_exact(a, a)["p_value"] == 1.0


def test_paired_comparison_of_a_clearly_worse_model():
    y, good = _data(500, seed=1)
    rng = np.random.default_rng(2)
    bad = [t if r < 0.4 else "a" for t, r in zip(y, rng.random(len(y)))]
    pr = paired(y, bad, good, LABELS, Resamples(len(y)))
    assert pr.macro_f1_diff < -0.2 and pr.macro_f1_diff_ci95[1] < 0
    assert pr.worse(0.05) and not pr.better(0.05) and pr.p_f1_worse < 0.01 and pr.mcnemar["p_a_worse"] < 1e-6
    assert pr.churn > 0.2
    again = paired(y, good, bad, LABELS, Resamples(len(y)))
    assert again.better(0.05) and again.macro_f1_diff == -pr.macro_f1_diff
    assert Paired.from_dict(pr.as_dict()) == pr
    same = paired(y, good, good, LABELS, Resamples(len(y)))
    assert same.churn == 0 and same.macro_f1_diff_ci95 == [0.0, 0.0] and not same.worse(0.05)


def test_paired_refuses_misaligned_rows():
    with pytest.raises(ValueError, match="rows"):
        paired(["a", "b"], ["a"], ["a", "b"], LABELS, Resamples(2))


def test_holm_step_down():
    # sorted 0.01, 0.02, 0.04 -> 3 * 0.01 = 0.03, max(0.03, 2 * 0.02) = 0.04, max(0.04, 1 * 0.04) = 0.04
    assert holm({"x": 0.04, "y": 0.01, "z": 0.02}) == {"x": 0.04, "y": 0.03, "z": 0.04}
    assert holm({"x": 0.6, "y": 0.5}) == {"x": 1.0, "y": 1.0}
    assert holm({}) == {}
