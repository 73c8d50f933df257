"""`align_data:` — the alignment task's pairs (text, code) and the items its index holds."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class AlignDataConfig(Section):
    """Pairs of a docstring and its function's code (or your pairs), split by file; the items to index."""

    min_code_chars: int = Field(1, ge=1)
    """A function (or your document) shorter than this, once its docstring is removed, is left out."""
