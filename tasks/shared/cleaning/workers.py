"""The per-text work of the corpus pass (cleaning, digests, near-dup band keys), in this process or in a pool.

With `workers`, pool processes do it on ~1 MB parts of each batch while the main process reads, deduplicates and
writes, batch by batch in order, so the output is the same byte for byte whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tasks.shared import lifeline
from tasks.shared.cleaning.dedup import NearDuplicates, text_digests
from tasks.shared.cleaning.filters import TextCleaner
from tasks.shared.cleaning.report import DatasetReport
from tasks.shared.config.clean import CleanConfig

if TYPE_CHECKING:
    import pyarrow as pa

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
    """Make this pool process a worker: CorpusWork for `cfg`, no Ctrl-C of its own, gone when the parent dies."""
    global _WORK
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops the pool
    os.environ["RAYON_NUM_THREADS"] = "1"  # rensa's MinHash: one thread per worker, the workers are the parallelism
    lifeline.watch(lambda reason: os._exit(1))  # the parent was killed: no orphans
    _WORK = CorpusWork(cfg, text_type)


def work(texts: list, ids: list, offset: int) -> CleanedPart:
    """CorpusWork of a part of a batch, in a pool worker (open_pool)."""
    return _WORK(texts, ids, offset)


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def open_pool(cfg: CleanConfig, text_type, parts: int, text_bytes: int = 0):
    """A pool of cfg.workers processes (0: one per CPU, at most one per PART_BYTES of text), at most one per
    part; None for one (the work stays in this process).

    The workers are forked from a fresh server process ("forkserver"), not from this one: a process forked
    after rensa's thread pool started would hang in its first MinHash call.
    """
    n = min(cfg.workers or min(cpu_count(), text_bytes // PART_BYTES), parts)
    if n <= 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__, "pyarrow"])
    return ctx.Pool(n, _start_worker, (cfg, text_type))
