"""`promote:` — the gates a candidate passes before `champion` moves to it (an operation, not a stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class PromoteConfig(Section):
    """Gates a candidate must pass before the `champion` alias moves to it."""

    variant: Literal["auto", "fp32", "int8"] = "auto"
    """Which variant to register; `auto` takes the best macro-F1 among those within budgets."""
    min_accuracy: float = Field(0.4, ge=0, le=1)
    """Absolute floor on test accuracy."""
    min_macro_f1: float = Field(0.3, ge=0, le=1)
    """Absolute floor on test macro-F1."""
    min_gain_over_majority: float = Field(0.1, ge=0, le=1)
    """Accuracy must beat the majority-class baseline by this much."""
    max_regression: float = Field(0.02, ge=0, le=1)
    """Macro-F1 may be at most this much below the current champion's."""
    max_latency_ms: float = Field(100.0, gt=0)
    """p50 latency budget for one text."""
    max_size_mb: float = Field(100.0, gt=0)
    """Size budget of the model files."""
    require_validation: bool = True
    """Data validation must have passed."""
