"""Deduplication: exact (64-bit digests in a compact hash index) and near-duplicate (MinHash + LSH bands).

Near-duplicates: R-MinHash signatures of lowercased word shingles (rensa, in Rust), cut into LSH bands
whose 64-bit hashes sit in sorted numpy runs (`HashIndex`) — a few bytes per document where an LSH index
of Python sets costs kilobytes. A text is dropped when one of its bands equals a band of an earlier kept
text, so every dropped text has a kept twin. The band/row split minimizes the false positive and negative
areas around the threshold, as datasketch does.
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np

MINHASH_SEED = 1337


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
        """Put `keys` (any shape) into the index."""
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
        """The lowercased word n-grams of `text` (the whole text when it has n words or fewer)."""
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
