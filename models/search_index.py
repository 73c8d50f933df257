"""Retrieval over the items of the alignment task: an HNSW vector index, exact search, BM25 and their fusion.

`SearchIndex` holds every item (a function, or a user's document) as one unit vector of the encoder's code tower,
in an approximate-nearest-neighbour graph (HNSW, inner product on unit vectors = cosine), beside the exact
vectors (for `exact` and for measuring the graph's recall) and a BM25 index of the items' code (`lexical_tokens`).
`search` answers one query in the mode serving asks for: "dense", "bm25" or "hybrid" (reciprocal-rank fusion of the
dense and BM25 rankings).

Backend: usearch, measured against faiss-cpu's IndexHNSWFlat (inner product) at the same settings (connectivity/M
32, ef_construction 128, ef_search 256) on random unit 128-d vectors, the hardest case for a graph (real embeddings
have far fewer intrinsic dimensions: the stdlib items, mean-pooled by the pretrained trunk, reach 0.99), on a 2-core
machine shared with other jobs (bench/search.py --parts backends repeats it):
- 16,500 vectors (the default corpus's size), one thread, CPU seconds: build 4.9 (usearch) vs 3.6 (faiss), query
  0.75 vs 0.45 ms, recall@10 vs exact 0.980 vs 0.991; two threads, wall: build 2.3 vs 5.5 s; 12.4 vs 12.3 MB on disk.
- 100,000 vectors, two threads under heavy load: build 426 vs 193 s wall, 75 MB each on disk, ~50 MB of build
  memory each, recall@10 0.80 vs 0.83 (random 128-d vectors need ef_search far above 256 at that size).
faiss is somewhat cheaper per query and per insertion and finds a little more per ef; both meet the issue's
targets with room (recall >= 0.98 on the default corpus, well under a millisecond of the 20 ms /search budget, a
few seconds of build beside the encoder's embedding of every item). usearch is kept for what serving carries: a
2 MB wheel with no OpenMP runtime (faiss-cpu brings ~65 MB of its own libgomp and OpenBLAS into the process where
torch runs its own OpenMP pool), a file that records its metric and dimensions, and thread-safe concurrent search.
Switching is local to `build_graph`, `_load_graph`, `dense` and `save`.

On disk (a folder; `save` writes it, the align_index stage wraps that in `tasks.shared.io.atomic_dir`):
    index.json          meta: format, backend, metric, encoder_version, dim, items, params (HNSW and BM25 settings),
                        extra (what the stage measured), files (size and sha256 of every other file)
    dense.usearch       the HNSW graph with its vectors (usearch's own binary format)
    vectors.npy         float32 (items, dim), unit rows: the exact vectors (numpy format, loaded without pickle)
    items.parquet       the items' table, row i = vector i
    bm25/               bm25s's own save format: numpy arrays (loaded with allow_pickle=False) and JSON
Nothing is pickled. `load` checks every file's size and sha256 against index.json before reading it: a missing,
truncated or altered file is an `ArtifactError` naming it. index.json is written last, so a folder left by an
interrupted `save` has none and does not load.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import bm25s
import numpy as np
import pandas as pd
from usearch.index import Index

from models.errors import ArtifactError
from models.files import file_sha256

RRF_K = 60
"""Reciprocal-rank fusion's constant (Cormack et al. 2009): a document's fused score is sum(1 / (RRF_K + rank))."""
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # acronyms first: HTTPServer -> http, server

FORMAT = 1
META = "index.json"
GRAPH = "dense.usearch"
VECTORS = "vectors.npy"
ITEMS = "items.parquet"
BM25_DIR = "bm25"
BACKEND = "usearch"
METRIC = "cos"
MODES = ("dense", "bm25", "hybrid")
FUSION_DEPTH = 100
"""Hybrid search fuses the dense and BM25 rankings' first max(k, FUSION_DEPTH) items."""
HIT_COLUMNS = ("qualname", "source", "line", "snippet")
"""Item columns every hit carries (beside id and score)."""


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


@dataclass(frozen=True)
class HnswParams:
    """The HNSW graph's settings (the align_index section documents them)."""

    connectivity: int = 32
    """Edges per node (HNSW's M): more = higher recall and a larger, slower-to-build graph."""
    ef_construction: int = 128
    """Candidates considered while inserting a node (usearch's expansion_add)."""
    ef_search: int = 256
    """Candidates considered per query (usearch's expansion_search): more = higher recall, slower queries."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """`vectors` as float32 rows of length 1 (a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `scores` (n, items), the `k` best column ids, best first (ties: the smaller id), and their scores."""
    n_items = scores.shape[1]
    k = min(k, n_items)
    if k < n_items:
        candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(n_items), scores.shape)
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -candidate_scores), axis=1)
    ids = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    return ids, np.take_along_axis(scores, ids, axis=1)


def build_graph(vectors: np.ndarray, params: HnswParams, threads: int = 0) -> Index:
    """The HNSW graph of unit `vectors` (key i = row i); `threads` 0 = all cores."""
    graph = Index(
        ndim=vectors.shape[1],
        metric="ip",  # inner product of unit vectors = cosine similarity; distance = 1 - cosine
        dtype="f32",
        connectivity=params.connectivity,
        expansion_add=params.ef_construction,
        expansion_search=params.ef_search,
    )
    graph.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=threads)
    return graph


def _bm25(codes: list[str]) -> bm25s.BM25:
    retriever = bm25s.BM25()
    retriever.index([lexical_tokens(c) for c in codes], show_progress=False)
    return retriever


class SearchIndex:
    """Every item's vector in an HNSW graph and as exact vectors, a BM25 index of their code, and their metadata."""

    backend = BACKEND
    metric = METRIC

    def __init__(self, graph: Index, vectors: np.ndarray, items: pd.DataFrame, bm25: bm25s.BM25, meta: dict):
        self.graph, self.vectors, self.items, self.bm25, self.meta = graph, vectors, items, bm25, meta
        self.encoder_version: str = meta["encoder_version"]
        self.params = HnswParams(**meta["params"]["hnsw"])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def build(
        cls, vectors: np.ndarray, items: pd.DataFrame, encoder_version: str, settings: HnswParams, threads: int = 0
    ) -> SearchIndex:
        """Index `vectors` (row i = `items` row i, which needs a `code` column for BM25); `threads` 0 = all cores."""
        if np.ndim(vectors) != 2 or len(vectors) != len(items) or not len(items):
            raise ValueError(f"vectors of shape {np.shape(vectors)} for {len(items)} items: need one row per item")
        vectors = unit_rows(vectors)
        graph = build_graph(vectors, settings, threads)
        items = items.reset_index(drop=True)
        bm25 = _bm25(items["code"].tolist())
        meta = {
            "format": FORMAT,
            "backend": BACKEND,
            "metric": METRIC,
            "encoder_version": encoder_version,
            "dim": int(vectors.shape[1]),
            "items": len(items),
            "params": {"hnsw": asdict(settings), "bm25": {"k1": bm25.k1, "b": bm25.b, "method": bm25.method}},
        }
        return cls(graph, vectors, items, bm25, meta)

    def save(self, folder: Path | str, extra: dict | None = None) -> None:
        """Write the index into `folder` (created if needed), index.json last; `extra` joins index.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.graph.save(str(folder / GRAPH))
        np.save(folder / VECTORS, self.vectors, allow_pickle=False)
        self.items.to_parquet(folder / ITEMS, index=False)
        self.bm25.save(str(folder / BM25_DIR), show_progress=False)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META)
        sums = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
        meta = {**self.meta, "extra": {**self.meta.get("extra", {}), **(extra or {})}, "files": sums}
        (folder / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        self.meta = meta

    @classmethod
    def load(cls, folder: Path | str) -> SearchIndex:
        """The index saved in `folder`.

        Raises:
            ArtifactError: naming the file that is missing, truncated, altered or unreadable.
        """
        folder = Path(folder)
        meta = _read_meta(folder / META)
        _verify(folder, meta["files"])
        graph = _load_graph(folder / GRAPH, HnswParams(**meta["params"]["hnsw"]))
        vectors = _load_vectors(folder / VECTORS)
        items = _load_items(folder / ITEMS)
        bm25 = _load_bm25(folder / BM25_DIR)
        counts = {"graph": len(graph), "vectors": len(vectors), "items": len(items), "bm25": bm25.scores["num_docs"]}
        if set(counts.values()) != {meta["items"]} or vectors.shape[1] != meta["dim"]:
            raise ArtifactError(
                folder / META,
                f"counts disagree with {meta['items']} items of dim {meta['dim']}: "
                f"{counts}, vectors of dim {vectors.shape[1]}",
            )
        return cls(graph, vectors, items, bm25, meta)

    def dense(self, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate nearest items of each query vector: (n, k) row ids and cosine scores, best first
        (k at most the item count; -1 and NaN pad a row the graph could not fill)."""
        q = unit_rows(np.atleast_2d(qvecs))
        k = min(k, len(self))
        matches = self.graph.search(q, k, threads=1)
        if len(q) == 1:  # usearch answers one query with an unpadded Matches
            found = len(matches.keys)
            ids = np.full((1, k), -1, dtype=np.int64)
            scores = np.full((1, k), np.nan, dtype=np.float32)
            ids[0, :found], scores[0, :found] = matches.keys, 1.0 - matches.distances
            return ids, scores
        filled = np.arange(k)[None, :] < np.asarray(matches.counts)[:, None]
        ids = np.where(filled, np.asarray(matches.keys).astype(np.int64), -1)
        return ids, np.where(filled, 1.0 - np.asarray(matches.distances, dtype=np.float32), np.nan)

    def exact(self, qvecs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact nearest items of each query vector (brute force on the stored vectors): (n, k) ids, scores."""
        return top_k(unit_rows(np.atleast_2d(qvecs)) @ self.vectors.T, k)

    def lexical(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 over the items' code: (n, k) row ids and scores, best first; -1 (score 0) past the items that share
        no word with the query."""
        k = min(k, len(self))
        tokens = [lexical_tokens(q) for q in queries]
        ids, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        ids, scores = np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float64)
        return np.where(scores > 0, ids, -1), np.where(scores > 0, scores, 0.0)

    def search(self, query: str, qvec: np.ndarray | None, k: int, mode: str) -> list[dict]:
        """The `k` best items for one query, in `mode` ("dense" and "hybrid" need `qvec`, the query's text-tower
        vector); each hit is {"id", "score", "qualname", "source", "line", "snippet"}."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        if mode != "bm25" and qvec is None:
            raise ValueError(f"mode {mode!r} needs the query's vector")
        depth = k if mode != "hybrid" else max(k, FUSION_DEPTH)
        rankings = []
        if mode != "bm25":
            ids, scores = self.dense(qvec, depth)
            rankings.append(_kept(ids[0], scores[0]))
        if mode != "dense":
            ids, scores = self.lexical([query], depth)
            rankings.append(_kept(ids[0], scores[0]))
        if mode == "hybrid":
            ids, scores = reciprocal_rank_fusion([r[0] for r in rankings], top=k)
        else:
            ids, scores = rankings[0]
        return [self.hit(int(i), float(s)) for i, s in zip(ids.tolist(), scores.tolist())]

    def hit(self, row: int, score: float) -> dict:
        """Item `row` as a search hit with `score` (None for a column the items lack)."""
        item = self.items.iloc[row]
        fields = {c: item[c] if c in item and pd.notna(item[c]) else None for c in HIT_COLUMNS}
        line = None if fields["line"] is None else int(fields["line"])
        text = {c: None if fields[c] is None else str(fields[c]) for c in ("qualname", "source", "snippet")}
        return {"id": str(item["id"]), "score": score, **text, "line": line}


def _kept(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ids >= 0
    return ids[keep], scores[keep]


def _read_meta(file: Path) -> dict:
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(file, "missing (no index here, or its writer was interrupted)") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(file, f"not valid JSON ({' '.join(str(e).split())[:200]})") from None
    need = ("format", "backend", "encoder_version", "dim", "items", "params", "files")
    if not isinstance(meta, dict) or (missing := [k for k in need if k not in meta]):
        raise ArtifactError(file, f"no {', '.join(missing) if isinstance(meta, dict) else 'JSON object'} entry")
    if meta["format"] != FORMAT or meta["backend"] != BACKEND:
        raise ArtifactError(
            file, f"format {meta['format']} / backend {meta['backend']}: this code reads format {FORMAT} / {BACKEND}"
        )
    return meta


def _verify(folder: Path, files: dict) -> None:
    """Every file index.json lists is there with its size and sha256 (and the index's own files are listed)."""
    for rel in (GRAPH, VECTORS, ITEMS):
        if rel not in files:
            raise ArtifactError(folder / META, f"lists no {rel}")
    for rel, want in files.items():
        f = folder / rel
        if not f.is_file():
            raise ArtifactError(f, "missing")
        if (size := f.stat().st_size) != want["size"]:
            raise ArtifactError(
                f, f"{'truncated' if size < want['size'] else 'wrong size'} ({size} bytes, {want['size']} expected)"
            )
        if file_sha256(f) != want["sha256"]:
            raise ArtifactError(f, "corrupt (sha256 mismatch)")


def _load_graph(file: Path, params: HnswParams) -> Index:
    try:
        graph = Index.restore(str(file))
    except (ValueError, RuntimeError) as e:
        raise ArtifactError(file, f"not a usearch index ({e})") from None
    if graph is None:
        raise ArtifactError(file, "not a usearch index")
    graph.expansion_search = params.ef_search  # not stored in the file
    return graph


def _load_vectors(file: Path) -> np.ndarray:
    try:
        vectors = np.load(file, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ArtifactError(file, f"not a numpy array ({e})") from None
    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise ArtifactError(file, f"{vectors.dtype} array of shape {vectors.shape}: float32 (items, dim) expected")
    return vectors


def _load_items(file: Path) -> pd.DataFrame:
    try:
        items = pd.read_parquet(file)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise ArtifactError(file, f"not a parquet table ({' '.join(str(e).split())[:200]})") from None
    if "id" not in items.columns:
        raise ArtifactError(file, "no id column")
    return items


def _load_bm25(folder: Path) -> bm25s.BM25:
    try:
        return bm25s.BM25.load(str(folder), allow_pickle=False, show_progress=False)
    except (ValueError, OSError, KeyError) as e:
        raise ArtifactError(folder, f"not a bm25s index ({' '.join(str(e).split())[:200]})") from None
