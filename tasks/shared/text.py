"""Text normalization shared by the clean stage and the servers, so a served request is read the way the
training and test texts were (Unicode form, newlines, tabs, control characters, trailing blanks)."""

from __future__ import annotations

import re
import unicodedata

_BLANK_RUNS = re.compile(r"\n{3,}")
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def normalize_text(text: str, unicode_form: str = "NFKC", tab_size: int = 4) -> str:
    """Normalize one text: Unicode form, newlines, tabs, control/format characters, blank lines."""
    text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(tab_size)
    if not text.isascii():
        text = "".join(c for c in text if c == "\n" or unicodedata.category(c) not in _DROP_CATEGORIES)
    else:
        text = "".join(c for c in text if c == "\n" or c >= " " and c != "\x7f")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")
