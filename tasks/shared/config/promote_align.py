"""`promote_align:` — the gates the encoder (task `align`) passes before its `champion` moves (an operation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class PromoteAlignConfig(Section):
    """Gates the encoder candidate must pass: against BM25, the index's recall, the champion, and a smoke test."""

    baselines: Literal["better", "not_worse", "report"] = "not_worse"
    """beats_bm25: the served search mode's test MRR against BM25's on the same queries (95% paired bootstrap interval
    of the difference): `better` fails unless the interval lies above 0, `not_worse` fails only when it lies below 0,
    `report` only shows the comparison."""
    min_index_recall: float = Field(0.98, ge=0, le=1)
    """index_recall fails when the approximate index finds less than this share of exact search's top 10."""
    max_regression: float = Field(0.02, ge=0, le=1)
    """no_regression fails on an MRR drop below the champion's larger than this whose 95% interval lies below 0, both
    searched with the candidate's test queries over its test pool (the champion is loaded from the registry)."""
    min_comparable_queries: int = Field(50, ge=1)
    """Test queries from files held out for both candidate and champion below which they are not comparable."""
