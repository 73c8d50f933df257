"""`align_evaluate:` — retrieval and zero-shot scores of the encoder against lexical baselines."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class AlignEvaluateConfig(Section):
    """Test scores with paired bootstrap intervals over queries (the same queries for every system)."""

    bootstrap_resamples: int = Field(1000, ge=100, le=100000)
    """Resamples of the test queries behind every 95% interval and comparison."""
    seed: int = 1337
    """Seeds the bootstrap's resamples."""
