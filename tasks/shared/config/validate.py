"""`validate:` — thresholds of the Great Expectations data contract (gx/)."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class ValidateConfig(Section):
    """Data contract thresholds, passed to the suites in gx/expectations/ as suite parameters."""

    min_corpus_rows: int = Field(200, ge=1)
    """The cleaned corpus must have at least this many rows."""
    min_rows_per_label: int = Field(10, ge=1)
    """Every label must have at least this many rows in every split."""
    min_class_share: float = Field(0.01, ge=0.0, le=1.0)
    """Every label must make up at least this share of every split's rows."""
    max_duplicate_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """At most this share of a table's rows (corpus, each split) may have a text another row has too;
    clean drops exact duplicates, so any left is a bug unless you clean elsewhere."""
    labels: list[str] = []
    """The allowed label set, each present in every split; [] = the configured stdlib packages
    (`ingest.packages`) for the default task, the training split's labels for your own data."""
