"""`evaluate:` — test-split evaluation of every variant and baseline."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class EvaluateConfig(Section):
    """Test-split evaluation of every variant and baseline."""

    batch_size: int = Field(64, ge=1)
    """Examples per forward pass for accuracy."""
    latency_samples: int = Field(64, ge=1)
    """Single-text requests timed per model (batch-1 latency)."""
    latency_batches: int = Field(16, ge=1)
    """Requests of 32 texts timed per model (batch-32 latency)."""
    behavioral_sample: int = Field(200, ge=1)
    """Test texts perturbed per invariance test (whitespace, blank lines, identifier renaming)."""
    seed: int = 1337
    """Seeds the behavioral tests' sample and perturbations, and the bootstrap's resamples."""
    bootstrap_resamples: int = Field(1000, ge=1000, le=100000)
    """Resamples of the test rows behind every 95% interval and paired comparison (the same rows for every model)."""
    tfidf_max_features: int = Field(50000, ge=100)
    """Vocabulary cap of the TF-IDF baseline."""
    tfidf_c: float = Field(10.0, gt=0)
    """Inverse regularization strength of the logistic-regression baseline."""
