"""`kg_graph:` — the knowledge graph: AST entities and facts plus what the extractor reads in every doc."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class KgGraphConfig(Section):
    """Build the pyoxigraph store and its N-Triples export from the task data and the extractor."""

    batch_size: int = Field(32, ge=1)
    """Docs per extractor forward pass."""
    min_confidence: float = Field(0.5, ge=0, le=1)
    """Extracted mentions and relations scored below this are left out of the graph."""
