"""`align_index:` — the approximate-nearest-neighbour index over every item, with its metadata."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class AlignIndexConfig(Section):
    """Embed every item with the code tower and index the vectors (and a BM25 index of the same items)."""

    batch_size: int = Field(64, ge=1)
    """Items per forward pass."""
