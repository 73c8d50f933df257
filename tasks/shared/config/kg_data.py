"""`kg_data:` — the knowledge-graph task's data: docstrings, silver mentions, relation candidates, the KB."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class KgDataConfig(Section):
    """Build the knowledge-graph task data from the clean corpus' code (or from your labeled spans)."""

    max_chars: int = Field(512, ge=32)
    """Longest text a model reads: a docstring is cut to at most this many characters, at a line boundary."""
    max_share_without_mentions: float = Field(0.25, ge=0, le=1)
    """Largest share of docs that have no mention (kept so the tagger learns what is not an entity; a seeded
    choice drops the rest); 1 keeps them all."""
    max_docs: int = Field(0, ge=0)
    """Keep at most this many docs per split, a seeded choice (0 = all); for tiny runs."""
    max_none_pairs: int = Field(20, ge=0)
    """Your data: `none` relation candidates per doc (ordered entity pairs you did not relate), a seeded choice."""
    entity_labels: list[str] = Field(default_factory=list)
    """The mention labels the data must use (Great Expectations); empty: the stdlib set, or your data's train labels."""
    relation_labels: list[str] = Field(default_factory=list)
    """The relation labels the data must use (with `none`); empty: the stdlib set, or your data's train labels."""
    min_docs: int = Field(10, ge=1)
    """Fewer docs is an error (Great Expectations)."""
    seed: int = 1337
    """Seed of the choices above (splits use `ingest.seed` and fractions, the same as classification)."""
