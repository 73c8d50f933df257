"""`promote_align:` — the gates the encoder (task `align`) passes before its `champion` moves (an operation)."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class PromoteAlignConfig(Section):
    """Gates the encoder candidate must pass: against BM25, the index's recall, the champion, and a smoke test."""

    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of the comparisons (Holm-corrected over each gate's tests)."""
