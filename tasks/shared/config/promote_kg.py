"""`promote_kg:` — the gates the extractor (task `kg`) passes before its `champion` moves (an operation)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class PromoteKgConfig(Section):
    """Gates the extractor candidate must pass: against its baselines, the current champion, and a smoke test."""

    baselines: Literal["better", "not_worse", "report"] = "not_worse"
    """beats_baselines, per head (entities, relations, links): `better` fails unless each head's score is
    significantly above its baseline's on the held-out files (paired bootstrap over documents, Holm over the heads);
    `not_worse` fails only when one is significantly below; `report` only shows the comparison."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of beats_baselines and no_regression (Holm-corrected over each gate's tests)."""
    max_regression: float = Field(0.02, ge=0, le=1)
    """no_regression fails on a drop of any head's score below the champion's larger than this that is also
    significant, both scored on the candidate's test documents (the champion is loaded from the registry and run
    again)."""
    min_comparable_docs: int = Field(50, ge=1)
    """Test documents from files held out for both candidate and champion below which they are not comparable."""
