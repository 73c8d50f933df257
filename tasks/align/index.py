"""align_index: every item's code embedded by the encoder's code tower, in an HNSW index beside BM25.

Reads `paths.align_data` (items.parquet: what the index holds; pairs.parquet: the test queries) and the dual
encoder at `paths.align_model`; writes the index folder (models/search_index.py describes it) to
`paths.align_index` atomically. Its recall is measured against exact search: the vectors of a seeded sample of
items, and the test pairs' queries embedded by the text tower, each ask for their 10 nearest items;
`index_recall_at_10` is the share of the exact top 10 the index returns, over both query sets together
(`..._items` and `..._queries` apart). Metrics (also in index.json's `extra`): index_recall_at_10,
index_build_s (graph and BM25, not the embedding), embed_s, index_size_mb, items, dim, backend.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from models.search_index import HnswParams, SearchIndex
from tasks.align.records import ITEM_COLUMNS, ITEMS_FILE, PAIRS_FILE
from tasks.shared.config.align_index import AlignIndexConfig
from tasks.shared.config.base import Paths
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"align_index": AlignIndexConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
RECALL_K = 10
CHUNK_ITEMS = 1024
"""Items per embed call: the progress bar moves once per chunk."""


@dataclass
class IndexResult:
    index_recall_at_10: float
    """ANN vs exact top 10 over the item sample and the test queries together."""
    index_recall_at_10_items: float
    index_recall_at_10_queries: float | None
    """None when the data has no test queries (a corpus of documents only)."""
    index_build_s: float
    embed_s: float
    items_per_second: float
    """Embedding throughput of the code tower."""
    index_size_mb: float
    items: int
    dim: int
    backend: str
    encoder_version: str

    @property
    def metrics(self) -> dict:
        return asdict(self)


def load_encoder(folder: Path):
    """The dual encoder at `folder` (models/dual_encoder.py; torch is imported there, so only when needed)."""
    from models.dual_encoder import load_encoder as load

    return load(folder)


def embed_all(encoder, texts: list[str], kind: str, batch_size: int) -> np.ndarray:
    """`texts` embedded by the `kind` tower, in order, with a progress bar; float32 (n, dim).

    The texts go to the encoder shortest first (a batch is padded to its longest text, so similar lengths waste
    less compute) and come back in their own order."""
    from tqdm import tqdm

    order = np.argsort([len(t) for t in texts], kind="stable")
    vectors = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    with tqdm(total=len(texts), desc=f"align_index embed {kind}", unit="item", dynamic_ncols=True) as bar:
        for i in range(0, len(texts), CHUNK_ITEMS):
            rows = order[i : i + CHUNK_ITEMS]
            vectors[rows] = encoder.embed([texts[r] for r in rows], kind, batch_size)
            bar.update(len(rows))
    return vectors


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row of `exact` (n, k) that the same row of `found` holds."""
    hits = [len(set(f) & set(e)) / len(e) for f, e in zip(found.tolist(), exact.tolist())]
    return float(np.mean(hits)) if hits else float("nan")


def index_recall(index: SearchIndex, queries: np.ndarray, k: int = RECALL_K) -> float:
    """recall@k of the index's approximate search against exact search, for the query vectors `queries`."""
    return recall_at_k(index.dense(queries, k)[0], index.exact(queries, k)[0])


def test_queries(data: Path) -> list[str]:
    """The test pairs' queries (none when the data has no pairs file or no test split)."""
    if not (data / PAIRS_FILE).exists():
        return []
    pairs = read_parquet(data / PAIRS_FILE, ["query", "split"])
    return pairs.loc[pairs["split"] == "test", "query"].tolist()


def measure_recall(index: SearchIndex, encoder, queries: list[str], cfg: AlignIndexConfig) -> dict[str, float | None]:
    """index_recall_at_10 on a seeded sample of the items' vectors, on the test queries, and on both together."""
    rng = np.random.default_rng(cfg.seed)
    sample = index.vectors[rng.choice(len(index), size=min(cfg.recall_sample, len(index)), replace=False)]
    qvecs = embed_all(encoder, queries, "text", cfg.batch_size) if queries else sample[:0]
    return {
        "index_recall_at_10": round(index_recall(index, np.concatenate([sample, qvecs])), 4),
        "index_recall_at_10_items": round(index_recall(index, sample), 4),
        "index_recall_at_10_queries": round(index_recall(index, qvecs), 4) if len(qvecs) else None,
    }


def hnsw_params(cfg: AlignIndexConfig) -> HnswParams:
    return HnswParams(connectivity=cfg.connectivity, ef_construction=cfg.ef_construction, ef_search=cfg.ef_search)


def dir_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def run(cfg: AlignIndexConfig, paths: Paths, tracker: Tracker | None = None, encoder=None) -> IndexResult:
    """Index `paths.align_data`'s items with the encoder (default: the bundle at `paths.align_model`)."""
    tracker = tracker or NullTracker()
    items = read_parquet(paths.align_data / ITEMS_FILE, ITEM_COLUMNS)
    encoder = encoder if encoder is not None else load_encoder(paths.align_model)
    t = time.perf_counter()
    vectors = embed_all(encoder, items["code"].tolist(), "code", cfg.batch_size)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    index = SearchIndex.build(vectors, items, encoder.version, hnsw_params(cfg))
    build_s = time.perf_counter() - t
    recall = measure_recall(index, encoder, test_queries(paths.align_data), cfg)
    measured = {**recall, "index_build_s": round(build_s, 3), "embed_s": round(embed_s, 3)}
    with atomic_dir(paths.align_index) as d:
        index.save(d, extra=measured)
        size_mb = dir_size_mb(d)
    result = IndexResult(
        **measured,
        items_per_second=round(len(items) / embed_s, 1) if embed_s > 0 else 0.0,
        index_size_mb=round(size_mb, 2),
        items=len(index),
        dim=index.dim,
        backend=index.backend,
        encoder_version=encoder.version,
    )
    print(
        f"align_index: {result.items:,} items of dim {result.dim} ({index.backend}), recall@10 vs exact "
        f"{result.index_recall_at_10:.4f}, embedded in {embed_s:.1f} s, built in {build_s:.1f} s, {size_mb:.1f} MB"
    )
    tracker.log_params({"align_index.encoder_version": encoder.version, "align_index.backend": index.backend})
    return result


def _run(params, tracker: Tracker) -> dict:
    return run(params.align_index, params.paths, tracker).metrics


def main() -> None:
    stage_main("align_index", _run, SECTIONS)


if __name__ == "__main__":
    main()
