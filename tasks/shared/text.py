"""Text normalization shared by the clean stage and the servers, so a served request is read the way the
training and test texts were (Unicode form, newlines, tabs, control characters, trailing blanks)."""

from __future__ import annotations

import re
import unicodedata
from functools import cache

_BLANK_RUNS = re.compile(r"\n{3,}")
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}
_ASCII_CONTROL = bytes([*range(10), *range(11, 32), 127])
"""ASCII control characters but the newline (tabs are expanded before they are dropped)."""
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


@cache
def _bmp_control() -> re.Pattern:
    """Every code point below U+10000 of a dropped category but the newline, as one character class: one
    C-level scan instead of a category lookup per character. Built on first use (~20 ms) from this Python's
    Unicode data, so it drops exactly what `unicodedata.category` would. (A class with astral ranges would
    make `re` test each character against every range: those rare characters are looked up one by one.)"""
    ranges, start = [], None
    for cp in range(0x10001):
        drop = cp < 0x10000 and cp != 10 and unicodedata.category(chr(cp)) in _DROP_CATEGORIES
        if drop and start is None:
            start = cp
        elif not drop and start is not None:
            ranges.append(f"\\u{start:04x}-\\u{cp - 1:04x}")
            start = None
    return re.compile(f"[{''.join(ranges)}]")


def _astral_kept(m: re.Match) -> str:
    return "" if unicodedata.category(m[0]) in _DROP_CATEGORIES else m[0]


def normalize_text(text: str, unicode_form: str = "NFKC", tab_size: int = 4) -> str:
    """Normalize one text: Unicode form, newlines, tabs, control/format characters, blank lines."""
    if text.isascii():
        return _normalize_ascii(text, tab_size)
    text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(tab_size)
    if text.isascii():
        return _normalize_ascii(text, tab_size)
    text = _bmp_control().sub("", text)
    if len(text.encode("utf-16-le", "surrogatepass")) > 2 * len(text):  # astral characters (rare): 4 bytes each
        text = _ASTRAL.sub(_astral_kept, text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    if "\n\n\n" in text:  # `in` scans at GB/s, the regex at ~100 MB/s on non-ASCII text
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")


def _normalize_ascii(text: str, tab_size: int) -> str:
    """normalize_text for ASCII text (which every Unicode form leaves as it is), each step skipped when a
    cheap test shows it would change nothing: the same result, several times faster on typical code."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if "\t" in text:
        text = text.expandtabs(tab_size)
    b = text.encode()
    kept = b.translate(None, _ASCII_CONTROL)
    if len(kept) != len(b):
        text = kept.decode()
    if " \n" in text or text.endswith(" "):  # the only whitespace left is " " and "\n"
        text = "\n".join(line.rstrip() for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n")
