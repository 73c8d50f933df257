"""`validate:` — thresholds of the Great Expectations data contract."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class ValidateConfig(Section):
    """Data contract thresholds passed to the Great Expectations suites."""

    min_corpus_rows: int = Field(200, ge=1)
    """The cleaned corpus must have at least this many rows."""
    min_rows_per_label: int = Field(10, ge=1)
    """Every label must have at least this many rows in every split."""
