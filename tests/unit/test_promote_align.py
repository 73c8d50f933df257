"""Promotion of task `align`: the gates read metrics/align.json's paired intervals and the index's recall."""

from __future__ import annotations

import pytest

from tasks.ops.promote_align import bm25_gate, index_gate
from tasks.shared.config.promote_align import PromoteAlignConfig


def evaluation(diff: float, lo: float, hi: float, mode: str = "hybrid", recall: float | None = 0.99) -> dict:
    return {
        "served_mode": mode,
        "mrr": 0.40,
        "hybrid_mrr": 0.45,
        "bm25_mrr": 0.40 - diff,
        "queries": 469,
        f"{mode}_minus_bm25_mrr": diff,
        f"{mode}_minus_bm25_mrr_ci95": [lo, hi],
        **({"index_recall_at_10": recall} if recall is not None else {}),
    }


@pytest.mark.parametrize(
    ("baselines", "interval", "passed"),
    [
        ("better", (0.05, 0.01, 0.09), True),
        ("better", (0.02, -0.01, 0.05), False),  # not significant: `better` needs the interval above 0
        ("not_worse", (0.02, -0.01, 0.05), True),
        ("not_worse", (-0.05, -0.09, -0.01), False),  # significantly worse
        ("report", (-0.05, -0.09, -0.01), True),
    ],
)
def test_bm25_gate_decides_on_the_paired_interval(baselines: str, interval: tuple, passed: bool) -> None:
    gate = bm25_gate(PromoteAlignConfig(baselines=baselines), evaluation(*interval))
    assert gate.passed is passed
    assert gate.configured is (baselines != "report")
    assert "hybrid" in gate.reason and "BM25" in gate.reason


def test_bm25_gate_judges_the_served_mode() -> None:
    gate = bm25_gate(PromoteAlignConfig(baselines="better"), evaluation(0.03, 0.01, 0.05, mode="dense"))
    assert gate.passed and gate.detail["mode"] == "dense"


def test_bm25_gate_fails_without_the_comparison() -> None:
    gate = bm25_gate(PromoteAlignConfig(), {"served_mode": "hybrid", "hybrid_mrr": 0.5})
    assert not gate.passed and "hybrid_minus_bm25_mrr" in gate.reason


@pytest.mark.parametrize(("recall", "passed"), [(0.99, True), (0.98, True), (0.97, False)])
def test_index_gate_needs_the_configured_recall(recall: float, passed: bool) -> None:
    gate = index_gate(PromoteAlignConfig(min_index_recall=0.98), evaluation(0.0, -0.1, 0.1, recall=recall))
    assert gate.passed is passed and f"{recall:.4f}" in gate.reason


def test_index_gate_fails_when_recall_was_not_measured() -> None:
    assert not index_gate(PromoteAlignConfig(), evaluation(0.0, -0.1, 0.1, recall=None)).passed


def test_bm25_gate_passes_when_bm25_itself_is_served() -> None:
    gate = bm25_gate(PromoteAlignConfig(baselines="better"), {"served_mode": "bm25", "served_mode_reason": "best val"})
    assert gate.passed and "BM25 itself" in gate.reason
