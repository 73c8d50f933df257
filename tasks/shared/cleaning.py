"""The clean stage's engine: normalize, scrub PII, filter and deduplicate one raw parquet file.

`clean_file` streams the corpus in bounded batches (memory stays flat as it grows: the only state that
grows is 8 bytes per kept text for exact dedup and 8 per LSH band for near-dup) and holds the labeled set in
memory (conflicting labels need a global view). Every filter counts what it removed or changed, keeps up
to three examples (taken after PII scrubbing, so no PII reaches a report) and explains itself in the
Markdown report.

Near-duplicates: R-MinHash signatures of lowercased word shingles (rensa, in Rust), cut into LSH bands
whose 64-bit hashes sit in sorted numpy runs (`HashIndex`) — a few bytes per document where an LSH index
of Python sets costs kilobytes. A text is dropped when one of its bands equals a band of an earlier kept
text, so every dropped text has a kept twin. The band/row split minimizes the false positive and negative
areas around the threshold, as datasketch does.

Speed: the per-text steps run over a batch at a time (the PII anchors searched once over the batch's texts
joined, letters and repeated characters counted with numpy lookup tables); with `workers`, pool processes
do them (and the digests and MinHash signatures) on ~1 MB parts while this process reads, deduplicates and
writes, batch by batch in order, so the output is the same byte for byte whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import sys
from bisect import bisect_right
from collections import Counter, deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, get_args

import numpy as np

from tasks.shared.config.clean import CleanConfig, PiiType
from tasks.shared.errors import UserError
from tasks.shared.io import atomic_file, parquet_batches
from tasks.shared.text import normalize_text

if TYPE_CHECKING:
    import pyarrow as pa

PII_TYPES: tuple[str, ...] = get_args(PiiType)
PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>", "secret": "<SECRET>"}
BATCH_BYTES = 16 << 20
"""A corpus batch holds at most about this much text, whatever batch_rows says."""
SNIPPET = 60
EXAMPLES = 3
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
MINHASH_SEED = 1337
REQUIRED = {"corpus": ["text"], "labeled": ["text", "label", "split"]}

# ---------------------------------------------------------------------------------------------- PII
# Each pattern is found from a cheap anchor (a literal first character lets `re` skip ahead at memchr
# speed); the full pattern then runs only in a small window around each anchor. Scanning the whole text
# with the full patterns (look-behinds first) runs at ~20 MB/s instead of ~1 GB/s.

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.\d)")  # not 1.2.3.4.5, v1.2.3.4, 01.02.03.04
_IPV4_ANCHOR = re.compile(r"\.\d{1,3}\.\d{1,3}\.")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]{2,39}(?![\w:]|\.\d)")  # not the head of ::ffff:1.2.3.4
_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{0,4}:")
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}\b")
_EMAIL_ANCHOR = re.compile(r"@[A-Za-z0-9-]{1,63}\.")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+\d{1,3}(?:[ -]?(?:\(\d{1,4}\)|\d{1,5})){1,6}"  # +44 20 7946 0958, +1-555-123-4567, +14155552671
    r"|(?:00\d{1,2}[ -]|1[ -])?(?:\(\d{3}\) ?\d{3}[ .-]|\d{3}([.-])\d{3}\1)\d{4}"  # (555) 123-4567, 555.123.4567
    r")(?:\s?(?:x|ext\.?)\s?\d{1,5})?(?![\w.-]?\d)"
)
_PHONE_ANCHORS = [re.compile(p) for p in (r"\+\d", r"\(\d{3}\)", r"-\d{3}-\d", r"\.\d{3}\.\d")]
_SECRET_PROBES = [
    re.compile(p).search
    for p in (
        r"A(?:KIA|SIA|GPA|IDA|ROA|NPA|NVA|IPA|Iza)",
        r"gh[pousr]_",
        "github_pat_",
        "xox",
        "sk-",
        r"k_(?:live|test)_",
    )
]
"""One literal-led search per prefix family of _SECRET_TOKEN: ~10x faster than one search with all of them."""
_SECRET_TOKEN = re.compile(
    r"\b(?:(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack tokens
    r"|sk-(?:[A-Za-z0-9]+-)?[A-Za-z0-9_-]{20,}"  # OpenAI-style keys
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API keys
    r"|[rs]k_(?:live|test)_[0-9A-Za-z]{16,})\b"  # Stripe keys
)
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",
    re.S,
)
_ASSIGNED = re.compile(  # the quoted value of `password = "..."`, `"api_key": "..."`, `AWS_SECRET_ACCESS_KEY='...'`
    r"(?i)(?<![a-z0-9])(?:[a-z0-9]+[_-])*(?:api[_-]?key|secret(?:[_-]?(?:access[_-]?)?key)?|(?:access|auth|bearer|refresh)?[_-]?token"
    r"|password|passwd|pwd|client[_-]?secret)[\"']?\s*[:=]\s*[\"']([^\"'\s<>]{8,})[\"']"
)
_ASSIGNED_HINT = re.compile(r"(?i)key|secret|token|pass|pwd")
_ASSIGNED_ANCHORS = [re.compile(c + r"""\s*["'][^"'\s<>]{8,}["']""") for c in "=:"]  # literal-led: fast


def _anchored(
    text: str,
    anchor: re.Pattern,
    full: re.Pattern,
    back: int,
    ahead: int,
    accept: Callable[[re.Match], bool] | None = None,
    group: int = 0,
    hint: re.Pattern | None = None,
) -> list[tuple[int, int]]:
    """Spans (of `group`) of the `full` matches that overlap an `anchor` match, looked for from `back`
    characters before each anchor to `ahead` characters after it (only if `hint` occurs there)."""
    spans: list[tuple[int, int]] = []
    pos = 0
    for a in anchor.finditer(text):
        if a.start() < pos:
            continue
        start, end = max(pos, a.start() - back), min(len(text), a.end() + ahead)
        if hint is not None and not hint.search(text, start, end):
            continue
        while (m := full.search(text, start, end)) is not None and m.start() <= a.start():
            whole = full.match(text, m.start())  # again without the window's end, which look-aheads take for the text's
            if whole is not None and whole.end() > a.start() and (accept is None or accept(whole)):
                spans.append(whole.span(group))
                pos = whole.end()
                break
            start = m.start() + 1
    return spans


_NUMBERED = re.compile(r"(?i)(?:version|release|section|chapter|rule|step|§)s?\W{0,3}\Z")


def _ipv4_ok(m: re.Match) -> bool:
    """Not a dotted section or version number ("section 12.2.5.4", "version 1.0.0.2")."""
    return not _NUMBERED.search(m.string, max(0, m.start() - 16), m.start())


def _ipv6_ok(m: re.Match) -> bool:
    s = m[0]
    if sum(c not in ":" for c in s) < 4:  # `::`, `::1`, slices such as `x[1::2]`
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _phone_ok(m: re.Match) -> bool:
    digits = sum(c.isdigit() for c in re.split(r"\s?(?:x|ext)", m[0])[0])
    return 10 <= digits <= 15 if m[0].startswith("+") else True


@dataclass(frozen=True)
class _Rule:
    """Find `full` around each match of `anchor` (see _anchored)."""

    kind: str
    anchor: re.Pattern
    full: re.Pattern
    back: int
    ahead: int
    accept: Callable[[re.Match], bool] | None = None
    group: int = 0
    hint: re.Pattern | None = None


_ORDER = ("secret", "email", "ip", "phone")
"""Replacement order: a secret may hold an e-mail-like or numeric part, an e-mail a dotted quad."""
_RULES = [
    *(_Rule("secret", a, _ASSIGNED, 80, 0, group=1, hint=_ASSIGNED_HINT) for a in _ASSIGNED_ANCHORS),
    _Rule("email", _EMAIL_ANCHOR, _EMAIL, 65, 300),
    _Rule("ip", _IPV4_ANCHOR, _IPV4, 4, 6, _ipv4_ok),
    _Rule("ip", _IPV6_ANCHOR, _IPV6, 40, 40, _ipv6_ok),
    *(_Rule("phone", a, _PHONE, 12, 24, _phone_ok) for a in _PHONE_ANCHORS),
]


def _pii_spans(text: str, kinds: Iterable[str], maybe: set | None = None) -> dict[str, list[tuple[int, int]]]:
    """Where each PII kind of `kinds` occurs in `text` (spans may overlap). `maybe` (from _prefilter) names the
    searches that can match in `text`: the others are skipped."""
    found: dict[str, list[tuple[int, int]]] = {}
    if "secret" in kinds:
        if (maybe is None or "key" in maybe) and "PRIVATE KEY" in text:
            found["secret"] = [m.span() for m in _PRIVATE_KEY.finditer(text)]
        if maybe is None or "probe" in maybe:
            for probe in _SECRET_PROBES:
                if probe(text):
                    found.setdefault("secret", []).extend(m.span() for m in _SECRET_TOKEN.finditer(text))
                    break
    for j, r in enumerate(_RULES):
        if (
            r.kind in kinds and (maybe is None or j in maybe) and r.anchor.search(text) is not None
        ):  # the common case stops here, in C
            spans = _anchored(text, r.anchor, r.full, r.back, r.ahead, r.accept, r.group, r.hint)
            if spans:
                found.setdefault(r.kind, []).extend(spans)
    return found


_SEPARATOR = "<"
"""Joins texts for _prefilter: no anchor or probe (nor "PRIVATE KEY") can match it, so every match lies in one text."""
_PRIVATE_KEY_HINT = re.compile("PRIVATE KEY")


def _prefilter(texts: list[str], kinds: Iterable[str]) -> list[set]:
    """For each of `texts`, the searches of _pii_spans that match in it ("key", "probe", rule numbers), each
    search run once over all the texts joined by _SEPARATOR (one call per text that has a match, not one per text)."""
    searches: list[tuple[object, Callable]] = []
    if "secret" in kinds:
        searches += [("key", _PRIVATE_KEY_HINT.search), *(("probe", p) for p in _SECRET_PROBES)]
    searches += [(j, r.anchor.search) for j, r in enumerate(_RULES) if r.kind in kinds]
    joined = _SEPARATOR.join(texts)
    starts = [0]
    for t in texts[:-1]:
        starts.append(starts[-1] + len(t) + len(_SEPARATOR))
    maybe: list[set] = [set() for _ in texts]
    for name, search in searches:
        pos = 0
        while (m := search(joined, pos)) is not None:
            k = bisect_right(starts, m.start()) - 1
            maybe[k].add(name)
            if k + 1 == len(starts):
                break
            pos = starts[k + 1]
    return maybe


def scrub_pii(text: str, types: Iterable[str] = PII_TYPES) -> tuple[str, dict[str, int]]:
    """Replace e-mail addresses, IP addresses, phone numbers and API keys/secrets in `text` with <EMAIL>,
    <IP>, <PHONE> and <SECRET>; returns the new text and how many of each type (of `types`) were replaced.

    Conservative on code: an IPv4 needs four valid octets and no fifth part (versions such as 1.2.3 and
    1.2.3.4.5 stay), an IPv6 needs at least four hex digits and must parse (slices such as `x[1::2]` stay), a
    phone number needs separators in a phone layout or a leading + country code with 10-15 digits (dates,
    hex and numeric literals stay), a secret is a known key format, a private key block or the quoted
    value (8+ characters) of an api_key/secret/token/password assignment.
    """
    return scrub_texts([text], types)[0]


def scrub_texts(texts: list[str], types: Iterable[str] = PII_TYPES) -> list[tuple[str, dict[str, int]]]:
    """scrub_pii of each of `texts`: the same results, the cheap searches that find candidates done once for all."""
    kinds = dict.fromkeys(types, 0)
    if not kinds:
        return [(t, {}) for t in texts]
    return [
        (t, dict(kinds)) if not maybe else _scrub(t, kinds, _pii_spans(t, kinds, maybe))
        for t, maybe in zip(texts, _prefilter(texts, kinds))
    ]


def _scrub(text: str, kinds: dict[str, int], found: dict[str, list[tuple[int, int]]]) -> tuple[str, dict[str, int]]:
    """Replace the PII `found` in `text`, one kind after the other (_ORDER), each found again in the text
    the ones before changed."""
    counts = dict(kinds)
    replaced = False
    for kind in _ORDER:
        if kind not in found:
            continue
        spans = sorted(_pii_spans(text, (kind,)).get(kind, []) if replaced else found[kind])
        parts, last, n = [], 0, 0
        for s, e in spans:
            if s < last:  # overlaps one already replaced
                continue
            parts += [text[last:s], PLACEHOLDERS[kind]]
            last, n = e, n + 1
        text = "".join(parts) + text[last:]
        counts[kind], replaced = n, True
    return text, counts


# ------------------------------------------------------------------------------------------ quality
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


def _char_bound(equal: int, length: int) -> float:
    return equal * 10 / 9 / length if length else 0.0


def repeated_char_bound(text: str) -> float:
    """A cheap upper bound of repeated_char_ratio (which scans at ~60 MB/s): 10/9 of the share of characters
    equal to their neighbour, blanks aside (a run of L characters has L-1 such pairs, L >= 10), counted by
    char_stats (in ASCII text, spaces and newlines removed first: the pairs they part may count)."""
    return _char_bound(char_stats([text])[2][0], len(text))


# ------------------------------------------------------------------------------------------ dedup
class HashIndex:
    """A set of uint64 keys in sorted numpy runs: 8 bytes a key (a Python set of ints takes ~70).

    New keys merge into an open run; a run that reaches `run_keys` is frozen, so a merge never copies more
    than one run (memory stays within a few MB of the keys' own size).
    """

    def __init__(self, run_keys: int = 1 << 20):
        self.run_keys = run_keys
        self.frozen: list[np.ndarray] = []
        self.open = np.empty(0, np.uint64)

    def __len__(self) -> int:
        return len(self.open) + sum(map(len, self.frozen))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` (any shape) are in the index."""
        flat = keys.ravel()
        found = np.zeros(len(flat), bool)
        for run in (*self.frozen, self.open):
            if len(run):
                i = np.minimum(np.searchsorted(run, flat), len(run) - 1)
                found |= run[i] == flat
        return found.reshape(keys.shape)

    def add(self, keys: np.ndarray) -> None:
        new = np.unique(keys.ravel())
        new = new[~self.contains(new)]
        if len(new):
            self.open = np.insert(self.open, np.searchsorted(self.open, new), new)
            if len(self.open) >= self.run_keys:
                self.frozen.append(self.open)
                self.open = np.empty(0, np.uint64)


def text_digests(texts: list[str]) -> np.ndarray:
    """64-bit BLAKE2b digests of `texts` (deterministic across processes, unlike hash())."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts),
        np.uint64,
        len(texts),
    )


def first_copies(digests: np.ndarray, index: HashIndex) -> np.ndarray:
    """Mask of the digests seen neither earlier in `digests` nor in `index`; adds them to `index`."""
    _, first = np.unique(digests, return_index=True)
    keep = np.zeros(len(digests), bool)
    keep[first] = True
    keep &= ~index.contains(digests)
    index.add(digests[keep])
    return keep


@cache
def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimizing the false positive + false negative areas of the LSH S-curve around
    `threshold` (equal weights, the criterion datasketch's MinHashLSH uses)."""
    x = np.linspace(0, 1, 2001)
    below = x <= threshold
    best, choice = np.inf, (1, num_perm)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1 - (1 - x**r) ** b
            err = np.trapezoid(p[below], x[below]) + np.trapezoid(1 - p[~below], x[~below])
            if err < best:
                best, choice = err, (b, r)
    return choice


_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit."""
    h = (h ^ (h >> np.uint64(30))) * _M2
    h = (h ^ (h >> np.uint64(27))) * _M3
    return h ^ (h >> np.uint64(31))


class NearDuplicates:
    """Streaming near-duplicate filter: `keep(texts)` says which texts have no near-twin among the texts
    kept so far (earlier calls and earlier in this call), and remembers the ones it keeps."""

    def __init__(self, threshold: float, shingle: int, num_perm: int):
        self.shingle, self.num_perm = shingle, num_perm
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.index = HashIndex()
        self.band_salt = _mix(np.arange(1, self.bands + 1, dtype=np.uint64) * _M1)

    def shingles(self, text: str) -> list[str]:
        words = text.lower().split()
        n = self.shingle
        if len(words) <= n:
            return [" ".join(words)] if words else []
        return [" ".join(g) for g in zip(*(words[i:] for i in range(n)))]

    def band_keys(self, texts: list[str], chunk: int = 1024) -> np.ndarray:
        """(len(texts), bands) uint64 hashes of each text's signature bands (`chunk` texts at a time: rensa
        hands signatures back as Python ints, ~4 KB a text)."""
        from rensa import RMinHash

        keys = np.empty((len(texts), self.bands), np.uint64)
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            sig = RMinHash.digest_matrix_from_token_sets([self.shingles(t) for t in part], self.num_perm, MINHASH_SEED)
            sig = np.array(sig.to_rows(), np.uint64)[:, : self.bands * self.rows].reshape(
                len(part), self.bands, self.rows
            )
            h = np.broadcast_to(self.band_salt, (len(part), self.bands))
            for j in range(self.rows):  # uint64 arrays wrap around silently
                h = _mix(h ^ sig[:, :, j])
            keys[start : start + len(part)] = h
        return keys

    @staticmethod
    def has_words(texts: list[str]) -> np.ndarray:
        """Which of `texts` have words: a text without any is kept, there is nothing to compare."""
        return np.fromiter((bool(t) and not t.isspace() for t in texts), bool, len(texts))

    def keys_of(self, texts: list[str]) -> np.ndarray:
        """band_keys of each of `texts` that has words, zeros for the others (keep_keys skips them)."""
        keys = np.zeros((len(texts), self.bands), np.uint64)
        todo = np.flatnonzero(self.has_words(texts))
        if len(todo):
            keys[todo] = self.band_keys([texts[i] for i in todo])
        return keys

    def keep(self, texts: list[str]) -> np.ndarray:
        """Which of `texts` to keep. `twins` then maps each dropped text whose kept twin is in this call
        to that twin's position (a twin from an earlier call is known only by its band hashes)."""
        return self.keep_keys(self.keys_of(texts), self.has_words(texts))

    def keep_keys(self, keys: np.ndarray, words: np.ndarray) -> np.ndarray:
        """keep() for texts given by their keys_of and has_words (computed elsewhere: in a pool worker)."""
        keep = np.ones(len(keys), bool)
        self.twins: dict[int, int] = {}
        todo = np.flatnonzero(words).tolist()
        if not todo:
            return keep
        keys = keys[todo]
        seen = self.index.contains(keys).any(axis=1)
        batch: dict[int, int] = {}  # band hash -> position of the kept text it came from
        for row, i in enumerate(todo):
            if seen[row]:
                keep[i] = False
                continue
            mine = keys[row].tolist()
            twin = next((batch[k] for k in mine if k in batch), None)
            if twin is None:
                batch.update(dict.fromkeys(mine, i))
            else:
                keep[i] = False
                self.twins[i] = twin
        self.index.add(keys[keep[todo]])
        return keep


# ------------------------------------------------------------------------------------------ report
CHANGES = ("normalized", "pii", "label_normalized")
"""Steps that change rows; every other entry of a report removes them."""
COUNTS = ("cross_split_duplicates",)
"""Counts within another filter's removals."""


def _cell(text: str) -> str:
    """`text` safe in a Markdown table cell: placeholders such as <EMAIL> shown, not taken for HTML."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _snippet(text: str) -> str:
    return repr(text[:SNIPPET] + ("…" if len(text) > SNIPPET else ""))


@dataclass
class DatasetReport:
    """What cleaning did to one dataset: counts, PII by type and a few examples per filter."""

    name: str
    why: dict[str, str]
    input_rows: int = 0
    output_rows: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    removed: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    extra: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def wants(self, key: str) -> bool:
        """Whether `key` has room for another example."""
        return len(self.examples.get(key, ())) < EXAMPLES

    def example(self, key: str, row_id, text: str, note: str = "") -> None:
        got = self.examples.setdefault(key, [])
        if len(got) < EXAMPLES:
            got.append(f"{row_id}{f' ({note})' if note else ''}: {_snippet(text)}")

    def remove(self, key: str, row_id, text: str, note: str = "") -> None:
        self.removed[key] += 1
        self.example(key, row_id, text, note)

    def merge(self, part: "DatasetReport") -> None:
        """Add the counts and examples of `part`, a report of the rows after those seen so far: the result is
        the report of all of them (counters keep the order in which their keys first occurred)."""
        for mine, theirs in (
            (self.removed, part.removed),
            (self.changed, part.changed),
            (self.pii, part.pii),
            (self.extra, part.extra),
        ):
            mine.update(theirs)
        for key, shown in part.examples.items():
            got = self.examples.setdefault(key, [])
            got += shown[: EXAMPLES - len(got)]

    def metrics(self) -> dict:
        """Numbers only (the DVC metric): rows and bytes in and out, rows removed/changed per filter, PII by type."""
        return {
            "input_rows": self.input_rows,
            "output_rows": self.output_rows,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "removed": {k: self.removed[k] for k in self.why if k not in CHANGES + COUNTS},
            "changed": {k: self.changed[k] for k in self.why if k in CHANGES},
            "pii": {k: self.pii[k] for k in PII_TYPES},
            **{k: self.extra[k] for k in self.why if k in COUNTS},
        }

    def line(self) -> str:
        """One stdout line."""
        parts = [f"{n} {k}" for k, n in self.removed.items() if n] + [
            f"{n} {k} (changed)" for k, n in self.changed.items() if n
        ]
        mb = f"{self.input_bytes / 1e6:.1f} -> {self.output_bytes / 1e6:.1f} MB"
        return (
            f"clean: {self.name}: kept {self.output_rows} of {self.input_rows} rows ({mb})"
            f"{': ' + ', '.join(parts) if parts else ''}"
        )

    def markdown(self) -> str:
        """A table: filter, rows removed or changed, share of input rows, why, examples (id: text)."""
        out = [
            f"## {self.name}",
            "",
            f"{self.input_rows} rows ({self.input_bytes / 1e6:.2f} MB of text) in, {self.output_rows} rows "
            f"({self.output_bytes / 1e6:.2f} MB) out.",
            "",
            "| filter | rows | share | why | examples |",
            "|---|---:|---:|---|---|",
        ]
        for key, why in self.why.items():
            n, verb = (
                (self.changed[key], "changed")
                if key in CHANGES
                else (self.extra[key], "")
                if key in COUNTS
                else (self.removed[key], "removed")
            )
            share = f"{n / self.input_rows:.2%}" if self.input_rows else "-"
            ex = "<br>".join(_cell(e) for e in self.examples.get(key, [])) or "-"
            out.append(f"| {key} | {f'{n} {verb}'.strip()} | {share} | {why} | {ex} |")
        if any(self.pii.values()):
            out += [
                "",
                "PII replaced: "
                + ", ".join(f"{n} {k} ({_cell(PLACEHOLDERS[k])})" for k, n in self.pii.items() if n)
                + ".",
            ]
        return "\n".join(out) + "\n"


def _why(cfg: CleanConfig, kind: str) -> dict[str, str]:
    max_chars = cfg.max_chars if kind == "corpus" else cfg.labeled_max_chars
    why = {
        "normalized": (
            f"Unicode {cfg.unicode_form}, newlines, tabs to {cfg.tab_size} spaces, control/format characters, "
            "trailing blanks, blank-line runs"
        ),
        "pii": f"{', '.join(cfg.pii_types)} replaced by typed placeholders" if cfg.pii else "off (pii: false)",
        "too_short": f"fewer than min_chars={cfg.min_chars} characters",
        "too_long": f"more than {'max_chars' if kind == 'corpus' else 'labeled_max_chars'}={max_chars} characters",
        "too_few_tokens": f"fewer than min_tokens={cfg.min_tokens} whitespace tokens"
        if cfg.min_tokens
        else "off (min_tokens: 0)",
        "too_many_tokens": f"more than max_tokens={cfg.max_tokens} whitespace tokens"
        if cfg.max_tokens
        else "off (max_tokens: 0)",
        "low_alpha": f"letters under min_alpha_ratio={cfg.min_alpha_ratio} of non-blank characters"
        if cfg.min_alpha_ratio
        else "off",
        "repeated_lines": (
            f"over max_repeated_line_ratio={cfg.max_repeated_line_ratio} of non-blank lines repeat an earlier one"
        )
        if cfg.max_repeated_line_ratio < 1
        else "off",
        "repeated_chars": (
            f"over max_repeated_char_ratio={cfg.max_repeated_char_ratio} of characters in runs of 10+ identical ones"
        )
        if cfg.max_repeated_char_ratio < 1
        else "off",
    }
    if kind == "labeled":
        why["label_normalized"] = f"label case {cfg.label_case}, whitespace collapsed, {len(cfg.label_aliases)} aliases"
        why["empty_label"] = "label empty after cleanup"
        why["label_conflicts"] = "the same text with different labels: every copy removed"
    why["duplicates"] = (
        ("identical to an earlier text" + (" (train copies first)" if kind == "labeled" else ""))
        if cfg.exact_dedup
        else "off"
    )
    why["near_duplicates"] = (
        f"word {cfg.near_dup_shingle}-gram Jaccard above ~{cfg.near_dup_threshold} with an earlier kept text "
        f"(MinHash {cfg.near_dup_num_perm} permutations, "
        f"LSH {'x'.join(map(str, lsh_bands(cfg.near_dup_threshold, cfg.near_dup_num_perm)))})"
        if cfg.near_dup
        else "off"
    )
    if kind == "labeled":
        why["cross_split_duplicates"] = (
            "removed duplicates whose kept copy is in another split (counted within duplicates)"
        )
    return why


# ------------------------------------------------------------------------------------------ filters
class TextCleaner:
    """The per-text steps: normalize, the length filters, PII scrubbing, the quality filters.

    Length comes before scrubbing so that texts about to be dropped (the longest ones, often) are not
    scrubbed; an example from a dropped text is scrubbed on its own, so no report shows PII. PII counts
    cover the texts that pass the length filters. Each step runs over a whole batch (the PII and quality
    steps look at all its texts at once); the report is then written row by row, as if each text had gone
    through all the steps before the next one.
    """

    def __init__(self, cfg: CleanConfig, kind: str, report: DatasetReport):
        self.cfg, self.report = cfg, report
        self.max_chars = cfg.max_chars if kind == "corpus" else cfg.labeled_max_chars

    def _shown(self, text: str) -> str:
        """What an example may show of `text`: its start, scrubbed (long enough to hold any whole PII item
        that reaches into the snippet)."""
        return scrub_pii(text[: SNIPPET * 5], self.cfg.pii_types)[0] if self.cfg.pii else text

    def __call__(self, text: str, row_id) -> str | None:
        """The cleaned text, or None (counted in the report) if a filter removes it."""
        return self.batch([text], [row_id])[0]

    def batch(self, texts: list, ids: list) -> list[str | None]:
        """The cleaned texts, None for each one a filter removes (counted in the report, in row order)."""
        cfg, rep = self.cfg, self.report
        raw = [t or "" for t in texts]  # a null text is an empty one: too short
        normal = [normalize_text(t, cfg.unicode_form, cfg.tab_size) for t in raw]
        length = [self.length_reason(t) for t in normal]
        passed = [i for i, r in enumerate(length) if r is None]
        scrubbed = (
            scrub_texts([normal[i] for i in passed], cfg.pii_types) if cfg.pii else [(normal[i], None) for i in passed]
        )
        quality = dict(zip(passed, self.quality_reasons([t for t, _ in scrubbed])))
        scrubbed = dict(zip(passed, scrubbed))
        out: list[str | None] = [None] * len(raw)
        for i, row_id in enumerate(ids):
            new = normal[i]
            if new != raw[i]:
                rep.changed["normalized"] += 1
                if rep.wants("normalized"):
                    rep.example("normalized", row_id, self._shown(new))
            reason = length[i]
            if reason is None:
                new, found = scrubbed[i]
                if found is not None and any(found.values()):
                    rep.pii.update(found)
                    rep.changed["pii"] += 1
                    if rep.wants("pii"):
                        at = min(i for i in (new.find(PLACEHOLDERS[k]) for k, n in found.items() if n) if i >= 0)
                        shown = ("…" if at > 20 else "") + new[max(0, at - 20) :]
                        rep.example("pii", row_id, shown, ", ".join(f"{n} {k}" for k, n in found.items() if n))
                reason = quality[i]
                if reason is None:
                    out[i] = new
                    continue
            rep.removed[reason[0]] += 1
            if rep.wants(reason[0]):
                rep.example(reason[0], row_id, self._shown(new), reason[1])
        return out

    def length_reason(self, text: str) -> tuple[str, str] | None:
        """The length filter (characters, whitespace tokens) that removes `text` and its length, or None."""
        cfg = self.cfg
        n = len(text)
        if n < cfg.min_chars:
            return "too_short", f"{n} chars"
        if n > self.max_chars:
            return "too_long", f"{n} chars"
        if cfg.min_tokens and (k := len(text.split(None, cfg.min_tokens))) < cfg.min_tokens:  # stops after min_tokens
            return "too_few_tokens", f"{k} tokens"
        if cfg.max_tokens and (k := len(text.split())) > cfg.max_tokens:
            return "too_many_tokens", f"{k} tokens"
        return None

    def quality_reason(self, text: str) -> tuple[str, str] | None:
        """The quality filter that removes `text` and its ratio, or None."""
        return self.quality_reasons([text])[0]

    def quality_reasons(self, texts: list[str]) -> list[tuple[str, str] | None]:
        """quality_reason of each of `texts` (their characters counted all at once: char_stats)."""
        cfg = self.cfg
        counted = cfg.min_alpha_ratio > 0 or cfg.max_repeated_char_ratio < 1
        letters, nonspace, equal = char_stats(texts) if counted else ([0] * len(texts),) * 3
        out: list[tuple[str, str] | None] = []
        for text, n_letters, n_nonspace, n_equal in zip(texts, letters, nonspace, equal):
            reason = None
            if cfg.min_alpha_ratio > 0 and (r := n_letters / n_nonspace if n_nonspace else 0.0) < cfg.min_alpha_ratio:
                reason = "low_alpha", f"{r:.2f} letters"
            elif cfg.max_repeated_line_ratio < 1 and (r := repeated_line_ratio(text)) > cfg.max_repeated_line_ratio:
                reason = "repeated_lines", f"{r:.2f} of lines"
            elif (
                cfg.max_repeated_char_ratio < 1
                and _char_bound(n_equal, len(text)) > cfg.max_repeated_char_ratio
                and (r := repeated_char_ratio(text)) > cfg.max_repeated_char_ratio
            ):
                reason = "repeated_chars", f"{r:.2f} of characters"
            out.append(reason)
        return out


# ------------------------------------------------------------------------------------------ files
def check_input(src: Path, kind: str):
    """Open the raw parquet `src` of `kind`; a UserError naming it if it is missing, unreadable or lacks a column."""
    import pyarrow.parquet as pq

    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found (run the stage that produces it first: `dvc repro`)")
    try:
        pf = pq.ParquetFile(src, buffer_size=1 << 20)  # buffered: a huge row group is read page by page
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{src}: unreadable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in REQUIRED[kind] if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{src}: missing column(s) {missing} (has {pf.schema_arrow.names})")
    return pf


def _all_filtered(rep: DatasetReport) -> UserError:
    why = ", ".join(f"{n} {k}" for k, n in rep.removed.items() if n) or "no rows in the input"
    return UserError(f"clean: every {rep.name} row was filtered out ({why}); check params.yaml clean:")


def _ids(table, start: int):
    """The `id` column as strings, or row numbers (from `start`) for a file written without one."""
    import pyarrow as pa

    if "id" in table.column_names:
        return table.column("id").cast(pa.string()).to_pylist()
    return [str(i) for i in range(start, start + table.num_rows)]


PART_BYTES = 1 << 20
"""With workers, a batch goes to them in parts of about this much text (the dedup and writing stay per batch)."""


@dataclass
class CleanedPart:
    """What the per-text work hands back for (part of) a corpus batch."""

    kept: np.ndarray
    """Positions (in the batch) of the texts the filters kept."""
    texts: pa.Array
    """Their cleaned texts."""
    digests: np.ndarray | None
    """Their text_digests (exact_dedup)."""
    keys: np.ndarray | None
    """Their NearDuplicates.keys_of (near_dup)."""
    words: np.ndarray | None
    """Their NearDuplicates.has_words (near_dup)."""
    report: DatasetReport
    """What the filters removed and changed, with examples, in these rows alone."""


class CorpusWork:
    """The per-text work of the corpus pass (cleaning, digests, near-dup band keys), in this process
    or a pool worker."""

    def __init__(self, cfg: CleanConfig, text_type):
        self.cfg, self.text_type = cfg, text_type
        self.near = (
            NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_shingle, cfg.near_dup_num_perm)
            if cfg.near_dup
            else None
        )

    def __call__(self, texts: list, ids: list, offset: int = 0) -> CleanedPart:
        import pyarrow as pa

        rep = DatasetReport("corpus", {})
        out = TextCleaner(self.cfg, "corpus", rep).batch(texts, ids)
        kept = [i for i, t in enumerate(out) if t is not None]
        cleaned = [out[i] for i in kept]
        near = self.near
        return CleanedPart(
            np.array(kept, np.int64) + offset,
            pa.array(cleaned, self.text_type),
            text_digests(cleaned) if self.cfg.exact_dedup else None,
            near.keys_of(cleaned) if near else None,
            near.has_words(cleaned) if near else None,
            rep,
        )

    @staticmethod
    def join(parts: list[CleanedPart]) -> CleanedPart:
        """One part from the consecutive `parts` of a batch."""
        import pyarrow as pa

        if len(parts) == 1:
            return parts[0]
        rep = parts[0].report
        for p in parts[1:]:
            rep.merge(p.report)

        def cat(name: str) -> np.ndarray | None:
            return None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])

        return CleanedPart(
            cat("kept"), pa.concat_arrays([p.texts for p in parts]), cat("digests"), cat("keys"), cat("words"), rep
        )


_WORK: CorpusWork | None = None
"""A pool worker's CorpusWork (set by _start_worker)."""


def _start_worker(cfg: CleanConfig, text_type) -> None:
    import signal

    from tasks.shared import lifeline

    global _WORK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    os.environ["RAYON_NUM_THREADS"] = "1"  # rensa's MinHash: one thread per worker, the workers are the parallelism
    lifeline.watch(lambda reason: os._exit(1))  # the parent was killed: no orphans
    _WORK = CorpusWork(cfg, text_type)


def _work(texts: list, ids: list, offset: int) -> CleanedPart:
    return _WORK(texts, ids, offset)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _pool(cfg: CleanConfig, text_type, parts: int, text_bytes: int = 0):
    """A pool of cfg.workers processes (0: one per CPU, at most one per PART_BYTES of text), at most one per
    part; None for one (the work stays in this process).

    The workers are forked from a fresh server process ("forkserver"), not from this one: a process forked
    after rensa's thread pool started would hang in its first MinHash call.
    """
    import multiprocessing

    n = min(cfg.workers or min(cpu_count(), text_bytes // PART_BYTES), parts)
    if n <= 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "pyarrow"])
    return ctx.Pool(n, _start_worker, (cfg, text_type))


def _clean_corpus(src: Path, dst: Path, cfg: CleanConfig, progress: bool) -> DatasetReport:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm import tqdm

    pf = check_input(src, "corpus")
    rep = DatasetReport("corpus", _why(cfg, "corpus"))
    exact = HashIndex() if cfg.exact_dedup else None
    near = NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_shingle, cfg.near_dup_num_perm) if cfg.near_dup else None
    meta = pf.metadata
    col = pf.schema_arrow.get_field_index("text")
    text_bytes = sum(meta.row_group(g).column(col).total_uncompressed_size for g in range(meta.num_row_groups))
    per_mb = max(1, meta.num_rows) / max(1, text_bytes)
    rows = max(1, min(cfg.batch_rows, int(BATCH_BYTES * per_mb)))
    part_rows = max(1, min(rows, int(PART_BYTES * per_mb)))
    schema = pf.schema_arrow.remove_metadata()
    if "id" in schema.names:
        schema = schema.set(schema.get_field_index("id"), pa.field("id", pa.string()))
    else:
        schema = schema.insert(0, pa.field("id", pa.string()))
    text_type = schema.field("text").type
    work = CorpusWork(cfg, text_type)
    bar = tqdm(
        total=text_bytes,
        desc="clean corpus",
        unit="B",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    small = [n for n in schema.names if n not in ("id", "text")]  # dictionary-encoding or min/max of texts: wasted work
    pool = _pool(cfg, text_type, -(-meta.num_rows // part_rows), text_bytes)
    pending: deque = deque()  # batches handed to the pool: at most two, so memory stays flat

    def finish(table, ids: list, nbytes: int, parts: list) -> None:
        got = CorpusWork.join([p if isinstance(p, CleanedPart) else p.get() for p in parts])
        rep.merge(got.report)
        keep = _dedup(rep, got, [ids[i] for i in got.kept], exact, near)
        if keep.any():
            rows_kept = pa.array(got.kept[keep], pa.int64())
            texts = got.texts.filter(pa.array(keep))
            out = (
                table.drop_columns(["text"])
                .take(rows_kept)
                .add_column(table.schema.get_field_index("text"), "text", texts)
            )
            if "id" not in out.column_names:
                out = out.add_column(0, "id", pa.array([ids[i] for i in got.kept[keep]], pa.string()))
            writer.write_table(out.cast(schema))
            rep.output_rows += len(texts)
            rep.output_bytes += int(pc.sum(pc.binary_length(texts)).as_py() or 0)
        bar.update(nbytes)

    try:
        with bar, pq.ParquetWriter(dst, schema, use_dictionary=small, write_statistics=small) as writer:
            for batch in parquet_batches(pf, rows):
                table = pa.Table.from_batches([batch])
                ids = _ids(table, rep.input_rows)
                raw = table.column("text").to_pylist()
                nbytes = int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)
                rep.input_rows += len(raw)
                rep.input_bytes += nbytes
                if pool is None:
                    finish(table, ids, nbytes, [work(raw, ids)])
                    continue
                parts = [
                    pool.apply_async(_work, (raw[a : a + part_rows], ids[a : a + part_rows], a))
                    for a in range(0, len(raw), part_rows)
                ]
                pending.append((table, ids, nbytes, parts))
                if len(pending) > 1:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
            bar.total = bar.n  # the total came from the file's (uncompressed) metadata
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C or an error: no worker outlives the pass
    return rep


def _dedup(
    rep: DatasetReport, got: CleanedPart, ids: list, exact: HashIndex | None, near: NearDuplicates | None
) -> np.ndarray:
    """Exact then near-duplicate removal of the texts of one batch the filters kept; which of them stay."""
    keep = np.ones(len(got.kept), bool)

    def remove(key: str, j: int, note: str = "") -> None:
        rep.removed[key] += 1
        if rep.wants(key):
            rep.example(key, ids[j], got.texts[j].as_py(), note)

    if exact is not None and keep.any():
        keep = first_copies(got.digests, exact)
        for j in np.flatnonzero(~keep):
            remove("duplicates", j)
    if near is not None and keep.any():
        left = np.flatnonzero(keep)
        mask = near.keep_keys(got.keys[left], got.words[left])
        for j in np.flatnonzero(~mask):
            twin = near.twins.get(j)
            remove("near_duplicates", left[j], f"like {ids[left[twin]]}" if twin is not None else "")
        keep[left[~mask]] = False
    return keep


def normalize_label(label: str, cfg: CleanConfig) -> str:
    """Whitespace stripped and collapsed, case folded (label_case), then renamed (label_aliases, whose keys
    are cleaned the same way). A null label becomes empty."""
    label = " ".join(("" if label is None or label != label else str(label)).split())
    label = label.lower() if cfg.label_case == "lower" else label.upper() if cfg.label_case == "upper" else label
    aliases = {" ".join(k.split()): v for k, v in cfg.label_aliases.items()}
    if cfg.label_case != "none":
        aliases = {(k.lower() if cfg.label_case == "lower" else k.upper()): v for k, v in aliases.items()}
    return aliases.get(label, label)


def _clean_labeled(src: Path, dst: Path, cfg: CleanConfig) -> DatasetReport:
    pf = check_input(src, "labeled")
    df = pf.read().to_pandas()
    rep = DatasetReport("labeled", _why(cfg, "labeled"))
    if "id" not in df.columns:
        df.insert(0, "id", [str(i) for i in range(len(df))])
    df["id"] = df["id"].astype(str)
    rep.input_rows = len(df)
    rep.input_bytes = int(sum(len(t.encode()) for t in df["text"]))
    bad_split = ~df["split"].isin(list(SPLIT_ORDER))
    if bad_split.any():
        raise UserError(
            f"{src}: row {df['id'][bad_split].iloc[0]}: split {df['split'][bad_split].iloc[0]!r} "
            f"is not one of {list(SPLIT_ORDER)}"
        )
    # train first, so that a text duplicated across splits keeps its training copy
    df = df.iloc[df["split"].map(SPLIT_ORDER).argsort(kind="stable")].reset_index(drop=True)
    clean = TextCleaner(cfg, "labeled", rep)
    texts = clean.batch(df["text"].tolist(), df["id"].tolist())
    df["text"] = texts
    df = df[df["text"].notna()].reset_index(drop=True)
    labels = df["label"].map(lambda v: normalize_label(v, cfg))
    for i in np.flatnonzero((labels != df["label"]).to_numpy()):
        rep.changed["label_normalized"] += 1
        rep.example("label_normalized", df["id"][i], df["text"][i], f"{df['label'][i]!r} -> {labels[i]!r}")
    df["label"] = labels
    empty = df["label"] == ""
    for i in np.flatnonzero(empty.to_numpy()):
        rep.remove("empty_label", df["id"][i], df["text"][i])
    df = df[~empty].reset_index(drop=True)
    n_labels = df.groupby("text", sort=False)["label"].transform("nunique")
    conflict = n_labels > 1
    for text, g in df[conflict].groupby("text", sort=False):
        firsts = g.drop_duplicates("label")
        note = " vs ".join(f"{lab!r} ({i})" for lab, i in zip(firsts["label"], firsts["id"]))
        rep.removed["label_conflicts"] += len(g)
        rep.example("label_conflicts", g["id"].iloc[0], text, note)
    df = df[~conflict].reset_index(drop=True)
    if cfg.exact_dedup and len(df):
        dup = df["text"].duplicated(keep="first")
        first = df[~dup].set_index("text")
        for i in np.flatnonzero(dup.to_numpy()):
            kept = first.loc[df["text"][i]]
            rep.remove("duplicates", df["id"][i], df["text"][i], f"copy of {kept['id']}")
            if kept["split"] != df["split"][i]:
                rep.extra["cross_split_duplicates"] += 1
        df = df[~dup].reset_index(drop=True)
    if cfg.near_dup and len(df):
        near = NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_shingle, cfg.near_dup_num_perm)
        keep = near.keep(df["text"].tolist())
        for i in np.flatnonzero(~keep):
            twin = near.twins[i]
            rep.remove("near_duplicates", df["id"][i], df["text"][i], f"like {df['id'][twin]} ({df['split'][twin]})")
        df = df[keep].reset_index(drop=True)
    rep.extra.setdefault("cross_split_duplicates", 0)
    rep.output_rows = len(df)
    rep.output_bytes = int(sum(len(t.encode()) for t in df["text"]))
    if len(df):
        df.to_parquet(dst, index=False)
    return rep


def clean_to(src: Path, tmp: Path, cfg: CleanConfig, kind: str, progress: bool = True) -> DatasetReport:
    """Clean `src` into `tmp` (no atomic rename: the caller owns it); a UserError if every row is filtered."""
    if kind not in REQUIRED:
        raise ValueError(f"kind must be 'corpus' or 'labeled', not {kind!r}")
    rep = _clean_corpus(src, tmp, cfg, progress) if kind == "corpus" else _clean_labeled(src, tmp, cfg)
    if not rep.output_rows:
        raise _all_filtered(rep)
    return rep


def clean_file(src: Path, dst: Path, cfg: CleanConfig, kind: str, progress: bool = True) -> dict:
    """Clean the raw parquet `src` ('corpus': streamed; 'labeled': in memory) into `dst`, written atomically.

    Returns the dataset's report (`DatasetReport.metrics()`: rows and bytes in and out, rows removed and
    changed per filter, PII by type). Raises a UserError naming the dataset and the filters if every row
    was removed (then `dst` is left as it was).
    """
    with atomic_file(dst) as tmp:
        return clean_to(Path(src), tmp, cfg, kind, progress).metrics()


def markdown_report(reports: list[DatasetReport]) -> str:
    """The whole cleaning report as Markdown: one table per dataset."""
    head = (
        "# Cleaning report\n\nRows removed or changed by each filter of the clean stage (params.yaml `clean:`), "
        "with up to three examples (id: text, after PII scrubbing).\n"
    )
    return head + "".join("\n" + r.markdown() for r in reports)
