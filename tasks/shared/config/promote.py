"""`promote:` — the gates a candidate passes before `champion` moves to it (an operation, not a stage)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class PromoteConfig(Section):
    """Gates a candidate must pass before the `champion` alias moves to it."""

    variant: str = Field("auto", min_length=1)
    """Which variant to register (fp32, int8, pruned, pruned-int8, sparse, distilled, distilled-int8, ...), or `auto`:
    the fastest at batch 1 among those within `f1_tolerance` of the best macro-F1 and within the budgets."""
    f1_tolerance: float = Field(0.01, ge=0, le=1)
    """auto: a variant competes on speed only if its macro-F1 is at most this far below the best variant's."""
    min_accuracy: float = Field(0.4, ge=0, le=1)
    """Absolute floor on test accuracy."""
    min_macro_f1: float = Field(0.3, ge=0, le=1)
    """Absolute floor on test macro-F1."""
    min_gain_over_majority: float = Field(0.1, ge=0, le=1)
    """Accuracy must beat the majority-class baseline by this much."""
    max_regression: float = Field(0.02, ge=0, le=1)
    """no_regression fails only on a drop larger than this that is also significant: macro-F1 (paired bootstrap) or
    accuracy (exact McNemar) below the current champion's, both scored on the same test rows (the champion is
    loaded from the registry and scored again; on the shared labels if the label set changed)."""
    alpha: float = Field(0.05, gt=0, lt=1)
    """Significance level of no_regression and beats_baselines (Holm-corrected over each gate's tests)."""
    baselines: Literal["better", "not_worse", "report"] = "not_worse"
    """beats_baselines: `not_worse` fails when the candidate is significantly worse than any trained baseline;
    `better` fails unless its macro-F1 is significantly better than every one; `report` only shows the comparison."""
    max_churn: float | None = Field(None, ge=0, le=1)
    """Largest share of test rows whose predicted label may change against the champion; null: report only."""
    min_comparable_rows: int = Field(100, ge=1)
    """When the champion was trained on files that are now test files, no_regression compares on the test rows
    held out for both; with fewer than this many it fails as not comparable (`lmforge promote --force --reason`)."""
    max_latency_ms: float = Field(100.0, gt=0)
    """p50 latency budget for a request of one text (tokenization included)."""
    min_behavioral_pass_rate: float = Field(0.6, ge=0, le=1)
    """Every behavioral test (invariances, minimum functionality) must pass at least this share of its cases."""
    max_size_mb: float = Field(100.0, gt=0)
    """Size budget of the model files."""
    max_perplexity: float | None = Field(200.0, gt=0)
    """Ceiling on the test perplexity of the language model behind /generate; null: not configured (no ceiling)."""
    require_validation: bool = True
    """The validation of the data version (DVC md5) the candidate was trained on must have passed;
    false: not configured."""
