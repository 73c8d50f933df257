"""`kg_evaluate:` — the extractor and its baselines on the held-out test docs."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class KgEvaluateConfig(Section):
    """Test scores of the extractor and the baselines with paired bootstrap intervals over documents."""

    batch_size: int = Field(32, ge=1)
    """Docs per forward pass."""
    bootstrap_resamples: int = Field(1000, ge=100, le=100000)
    """Resamples of the test docs behind every 95% interval and comparison (the same docs for every system)."""
    seed: int = 1337
    """Seeds the bootstrap's resamples."""
