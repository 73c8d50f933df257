"""Retrieval pieces shared by the alignment task's stages and the serving core: lexical tokens and rank fusion.

(The index class itself joins this module: see the align_index stage.)
"""

from __future__ import annotations

import re

import numpy as np

RRF_K = 60
"""Reciprocal-rank fusion's constant (Cormack et al. 2009): a document's fused score is sum(1 / (RRF_K + rank))."""
_WORD = re.compile(r"[A-Za-z][a-z]*|[A-Z]+(?![a-z])|\d+")


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words of `text` for BM25 and TF-IDF, with identifiers split at `_` and camelCase humps (code's
    `get_event_loop` and `getEventLoop` both match a query's "get event loop")."""
    return [w.lower() for w in _WORD.findall(text)]


def reciprocal_rank_fusion(
    rankings: list[np.ndarray], k: int = RRF_K, top: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse rankings (each an array of item ids, best first; they may differ in length and items) into one.

    Returns:
        The fused item ids, best first (ties broken by the smallest id), and their fused scores; `top` keeps the first.
    """
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(np.asarray(ranking).tolist()):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank + 1)
    order = sorted(scores, key=lambda i: (-scores[i], i))[:top]
    return np.asarray(order, dtype=np.int64), np.asarray([scores[i] for i in order], dtype=np.float64)
