"""`evaluate:` — test-split evaluation of every variant and baseline."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class EvaluateConfig(Section):
    """Test-split evaluation of every variant and baseline."""

    batch_size: int = Field(64, ge=1)
    """Examples per forward pass for accuracy."""
    latency_samples: int = Field(64, ge=1)
    """Single-example requests timed for latency."""
    tfidf_max_features: int = Field(50000, ge=100)
    """Vocabulary cap of the TF-IDF baseline."""
    tfidf_c: float = Field(10.0, gt=0)
    """Inverse regularization strength of the logistic-regression baseline."""
