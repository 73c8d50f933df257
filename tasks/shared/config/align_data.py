"""`align_data:` — the alignment task's pairs (text, code) and the items its index holds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.base import Section


class AlignDataConfig(Section):
    """Pairs of a docstring and its function's code (or your pairs), split by file; the items to index."""

    query: Literal["first_sentence", "docstring"] = "first_sentence"
    """What evaluation searches with (each pair's `query`): the first sentence of the text's first paragraph
    (`first_sentence`; the whole paragraph if it has no sentence end), or the whole text (`docstring`)."""
    min_code_chars: int = Field(1, ge=1)
    """A function (or your document) shorter than this, once its docstring is removed, is left out (counted)."""
    max_text_chars: int = Field(4000, ge=0)
    """Texts (and queries) longer than this are cut to it (counted); 0 = never cut."""
    max_code_chars: int = Field(20000, ge=0)
    """Code (of pairs and items) longer than this is cut to it (counted); 0 = never cut. The encoder reads
    only its first `max_code_length` tokens anyway; BM25 and the served snippet read the stored code."""
