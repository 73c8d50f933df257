"""Quality measures of a text: letters, repeated lines, runs of one character (and a cheap bound of the last).

`char_stats` counts a whole batch at once: ASCII texts with bytes.translate and a big-int XOR, the others with
numpy lookup tables of their code points.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Callable

import numpy as np

_ASCII_LETTERS = bytes(range(65, 91)) + bytes(range(97, 123))
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # what str.split() splits an ASCII text at
_CHAR_RUN = re.compile(r"(\S)\1{9,}")


def char_stats(texts: list[str]) -> tuple[list[int], list[int], list[int]]:
    """For each of `texts`: its letters (str.isalpha), its non-whitespace characters (str.isspace, what
    str.split() splits at) and its characters equal to their neighbour, blanks aside (see repeated_char_bound).

    ASCII texts are counted with bytes.translate and a big-int XOR; the others all at once with numpy lookup
    tables of their code points (~100 MB/s instead of ~20 MB/s for a character loop), in chunks of ~1M.
    """
    letters, nonspace, equal = [0] * len(texts), [0] * len(texts), [0] * len(texts)
    rest = []
    for i, text in enumerate(texts):
        if not text.isascii():
            rest.append(i)
            continue
        b = text.encode()
        nonspace[i] = len(b.translate(None, _ASCII_SPACE))
        letters[i] = len(b) - len(b.translate(None, _ASCII_LETTERS))
        b = b.translate(None, b" \n")  # the only whitespace normalize_text leaves in ASCII text
        if len(b) >= 2:
            equal[i] = (
                (int.from_bytes(b[1:], "big") ^ int.from_bytes(b[:-1], "big")).to_bytes(len(b) - 1, "big").count(0)
            )
    start, size = 0, 0
    for j, i in enumerate(rest):
        size += len(texts[i])
        if size >= 1 << 20 or j == len(rest) - 1:
            part = rest[start : j + 1]
            for i, n in zip(part, zip(*_unicode_stats([texts[i] for i in part]))):
                letters[i], nonspace[i], equal[i] = n
            start, size = j + 1, 0
    return letters, nonspace, equal


@cache
def _bmp_table(predicate: Callable[[str], bool]) -> np.ndarray:
    """`predicate` of every code point below U+10000, as a lookup table."""
    return np.fromiter(map(predicate, map(chr, range(0x10000))), bool, 0x10000)


def _flags(codes: np.ndarray, predicate: Callable[[str], bool]) -> np.ndarray:
    """`predicate` of each code point of `codes`: a table lookup below U+10000, one call per distinct one above."""
    if codes.dtype == np.uint16:
        return _bmp_table(predicate)[codes]
    flags = _bmp_table(predicate)[codes & 0xFFFF]
    astral = codes > 0xFFFF
    if astral.any():
        distinct, where = np.unique(codes[astral], return_inverse=True)
        flags[astral] = np.fromiter((predicate(chr(c)) for c in distinct.tolist()), bool, len(distinct))[where]
    return flags


def _unicode_stats(texts: list[str]) -> tuple[list[int], list[int], list[int]]:
    """char_stats of non-empty texts, with numpy."""
    lengths = np.fromiter(map(len, texts), np.int64, len(texts))
    starts = np.cumsum(lengths) - lengths
    raw = "".join(texts).encode("utf-16-le", "surrogatepass")
    if len(raw) == 2 * int(lengths.sum()):  # no astral characters: 16 bits each
        codes = np.frombuffer(raw, np.uint16)
    else:
        codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32)
    letters = np.add.reduceat(_flags(codes, str.isalpha), starts, dtype=np.int64)
    spaces = np.add.reduceat(_flags(codes, str.isspace), starts, dtype=np.int64)
    same = np.zeros(
        len(codes), bool
    )  # same as the character before, and not a blank (a text's first one may count: a bound)
    same[1:] = (codes[1:] == codes[:-1]) & (codes[1:] != 32) & (codes[1:] != 10)
    equal = np.add.reduceat(same, starts, dtype=np.int64)
    return letters.tolist(), (lengths - spaces).tolist(), equal.tolist()


def alpha_ratio(text: str) -> float:
    """Letters (str.isalpha) as a share of the non-whitespace characters of `text`."""
    letters, nonspace, _ = char_stats([text])
    return letters[0] / nonspace[0] if nonspace[0] else 0.0


def repeated_line_ratio(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line, for text as normalize_text leaves it (no
    trailing blanks, so a blank line is empty). Indentation counts: the same statement at two depths of a
    program is not a repeat."""
    lines = text.split("\n")
    blank = lines.count("")
    nonblank = len(lines) - blank
    if not nonblank:
        return 0.0
    return (nonblank - (len(set(lines)) - (1 if blank else 0))) / nonblank


def repeated_char_ratio(text: str) -> float:
    """Share of characters inside runs of 10 or more identical non-whitespace characters."""
    return sum(m.end() - m.start() for m in _CHAR_RUN.finditer(text)) / len(text) if text else 0.0


def char_bound(equal: int, length: int) -> float:
    """repeated_char_bound of a text of `length` characters, `equal` of them equal to their neighbour."""
    return equal * 10 / 9 / length if length else 0.0


def repeated_char_bound(text: str) -> float:
    """A cheap upper bound of repeated_char_ratio (which scans at ~60 MB/s): 10/9 of the share of characters
    equal to their neighbour, blanks aside (a run of L characters has L-1 such pairs, L >= 10), counted by
    char_stats (in ASCII text, spaces and newlines removed first: the pairs they part may count)."""
    return char_bound(char_stats([text])[2][0], len(text))
