"""Retrieval scores of the alignment task: the gold's rank per query, recall@k, MRR, their bootstrap intervals.

Every system scores each query against every candidate (a (queries, candidates) matrix); the gold's rank is
counted pessimistically: rank = the number of candidates scoring at least the gold's score (a tie with the gold
counts against it, so a system that scores everything 0 gets the worst rank, not a lucky one). A ranking
(`ranking`) orders the candidates the same way: best first, the gold after the candidates it ties with, then by
position. The hybrid fuses the top of two rankings with reciprocal-rank fusion (models/search_index.py, as the
service does); a gold outside the fused lists has rank inf (recall 0, reciprocal rank 0).

Intervals and differences are a paired bootstrap over queries: one seeded matrix of resampled queries
(`tasks.shared.stats.Resamples`) and every system scored on the same resamples, so the interval of a difference is
the percentile interval of the per-resample differences (`<metric>_ci95`).

The test pool (`query_pool`) is align_data's test pairs (queries) and test items (what they search); promotion
compares two encoders on it with `compare_encoders`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import bm25s
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer

from models.search_index import RRF_K, lexical_tokens, reciprocal_rank_fusion
from tasks.align.records import read_items, read_pairs
from tasks.shared.config.align_evaluate import AlignEvaluateConfig
from tasks.shared.config.base import Paths
from tasks.shared.errors import UserError
from tasks.shared.stats import Resamples, interval

if TYPE_CHECKING:
    from models.dual_encoder import Encoder

CUTOFFS = (1, 10)
"""The k of every recall@k reported."""
"""The align_data stage's tables in paths.align_data."""


@dataclass(frozen=True)
class QueryPool:
    """The test queries and the items they search; `gold[i]` is the row of query i's item in `items`."""

    queries: pd.DataFrame
    items: pd.DataFrame
    gold: np.ndarray


def query_pool(pairs: pd.DataFrame, items: pd.DataFrame, where: Path, split: str = "test") -> QueryPool:
    """The pairs and the items of `split` (of the align data in `where`); each pair's gold item must be in the pool."""
    queries = pairs[pairs["split"] == split].reset_index(drop=True)
    pool = items[items["split"] == split].reset_index(drop=True)
    if queries.empty:
        raise UserError(f"{where}: no {split} pairs to evaluate")
    row = pd.Series(np.arange(len(pool)), index=pool["id"])
    missing = sorted(set(queries["id"]) - set(pool["id"]))
    if missing:
        raise UserError(f"{where}: {len(missing)} {split} pairs have no {split} item (e.g. id {missing[0]!r})")
    return QueryPool(queries, pool, row.loc[queries["id"]].to_numpy())


def load_pool(folder: Path | str, split: str = "test") -> QueryPool:
    """The `split` pool of the align data in `folder` (paths.align_data)."""
    folder = Path(folder)
    return query_pool(read_pairs(folder), read_items(folder), folder, split)


def dense_scores(encoder: Encoder, pool: QueryPool, batch_size: int) -> np.ndarray:
    """Cosine of every query (text tower) with every pool item (code tower): (queries, items)."""
    text = encoder.embed(pool.queries["query"].tolist(), "text", batch_size)
    return text @ encoder.embed(pool.items["code"].tolist(), "code", batch_size).T


def gold_ranks(scores: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """1-based rank of each query's gold column in `scores` (queries, candidates), ties counted against the gold."""
    gold_scores = scores[np.arange(len(gold)), gold][:, None]
    return (scores >= gold_scores).sum(1).astype(float)


def ranking(scores: np.ndarray, gold: np.ndarray, depth: int) -> np.ndarray:
    """The first `depth` candidates of each query (queries, depth), best first; the gold after its ties."""
    is_gold = np.zeros(scores.shape, dtype=np.int8)
    is_gold[np.arange(len(gold)), gold] = 1
    return np.lexsort((is_gold, -scores), axis=-1)[:, :depth]  # lexsort's last key is the primary one


def fused_ranks(a: np.ndarray, b: np.ndarray, gold: np.ndarray, k: int = RRF_K) -> tuple[np.ndarray, np.ndarray]:
    """Reciprocal-rank fusion of rankings `a` and `b` (queries, depth) per query: the gold's rank (inf when neither
    list holds it; ties of fused scores counted against the gold) and the fused lists' first 10 candidates."""
    ranks, tops = np.full(len(gold), np.inf), np.full((len(gold), 10), -1, dtype=np.int64)
    for q, (ra, rb) in enumerate(zip(a, b)):
        ids, fused = reciprocal_rank_fusion([ra, rb], k=k)
        tops[q, : min(10, len(ids))] = ids[:10]
        hit = np.flatnonzero(ids == gold[q])
        if hit.size:
            ranks[q] = np.sum(fused >= fused[hit[0]])
    return ranks, tops


def per_query(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query values whose means are the metrics: `recall_at_<k>` (hit or not) and `mrr` (1 / rank)."""
    values = {f"recall_at_{k}": (ranks <= k).astype(float) for k in CUTOFFS}
    return values | {"mrr": 1.0 / ranks}


def with_interval(values: np.ndarray, idx: np.ndarray) -> tuple[float, list[float]]:
    """The mean of per-query `values` and its 95% bootstrap interval over the resampled queries `idx` (R, queries)."""
    return round(float(values.mean()), 4), interval(values[idx].mean(1))


def paired_difference(a: np.ndarray, b: np.ndarray, idx: np.ndarray) -> tuple[float, list[float]]:
    """Mean of a - b over the same queries and its paired 95% bootstrap interval (resampled queries `idx`)."""
    return with_interval(a - b, idx)


def system_metrics(ranks: np.ndarray, idx: np.ndarray, prefix: str = "") -> dict:
    """`<prefix>recall_at_1`, `<prefix>recall_at_10`, `<prefix>mrr`, each with its `_ci95` interval."""
    out = {}
    for name, values in per_query(ranks).items():
        out[f"{prefix}{name}"], out[f"{prefix}{name}_ci95"] = with_interval(values, idx)
    return out


def bm25_scores(documents: list[str], queries: list[str], k1: float, b: float) -> np.ndarray:
    """BM25 (bm25s, Lucene's variant) of each query against each document, both as `lexical_tokens`:
    (queries, documents); a query with no token scores 0 everywhere."""
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index([lexical_tokens(d) for d in documents], show_progress=False)
    scores = np.zeros((len(queries), len(documents)), dtype=np.float32)
    for q, query in enumerate(queries):
        if tokens := lexical_tokens(query):
            scores[q] = retriever.get_scores(tokens)
    return scores


def tfidf_scores(documents: list[str], queries: list[str]) -> np.ndarray:
    """TF-IDF cosine (scikit-learn, idf fitted on the documents, `lexical_tokens`) of queries against documents."""
    vectorizer = TfidfVectorizer(analyzer=lexical_tokens)
    docs = vectorizer.fit_transform(documents)  # rows are L2-normalised: the dot product is the cosine
    return (vectorizer.transform(queries) @ docs.T).toarray()


def compare_encoders(
    candidate: Encoder, champion: Encoder, paths: Paths, query_ids: list[str], cfg: AlignEvaluateConfig
) -> dict:
    """Dense MRR of two encoders on the test queries `query_ids` over the whole test pool of paths.align_data, as
    align_evaluate ranks them: `candidate`, `champion`, `diff` (candidate - champion) and its paired `ci95`."""
    pool = load_pool(paths.align_data)
    keep = pool.queries["id"].astype(str).isin(set(query_ids)).to_numpy()
    pool = QueryPool(pool.queries[keep].reset_index(drop=True), pool.items, pool.gold[keep])
    if pool.queries.empty:
        raise UserError(f"{paths.align_data}: none of the {len(query_ids)} queries compared is a test pair")
    mrr = [
        per_query(gold_ranks(dense_scores(e, pool, cfg.batch_size), pool.gold))["mrr"] for e in (candidate, champion)
    ]
    idx = Resamples(len(pool.gold), cfg.bootstrap_resamples, cfg.seed).indices()
    diff, ci = paired_difference(mrr[0], mrr[1], idx)
    return {
        "candidate": round(float(mrr[0].mean()), 4),
        "champion": round(float(mrr[1].mean()), 4),
        "diff": diff,
        "ci95": ci,
        "queries": len(pool.gold),
    }
