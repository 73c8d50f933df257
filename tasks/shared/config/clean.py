"""`clean:` — text normalization and filters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.base import Section


class CleanConfig(Section):
    """Normalize, filter and deduplicate text."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    """Unicode normalization form."""
    tab_size: int = Field(4, ge=1, le=16)
    """Tabs become this many spaces."""
    min_chars: int = Field(40, ge=1)
    """Drop texts shorter than this after cleaning."""
    max_chars: int = Field(60000, ge=1)
    """Drop corpus texts longer than this."""
    labeled_max_chars: int = Field(6000, ge=1)
    """Drop labeled texts longer than this."""

    @model_validator(mode="after")
    def _check(self) -> "CleanConfig":
        if self.min_chars > min(self.max_chars, self.labeled_max_chars):
            raise ValueError("min_chars must not exceed max_chars or labeled_max_chars")
        return self
