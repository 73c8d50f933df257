"""The alignment task's retrieval: index build time and memory, query latency, embedding throughput.

    make pipeline                                  # builds the encoder and the index (or: dvc repro align_index)
    python bench/search.py                         # or: lmforge bench search
    python bench/search.py --parts index --synthetic 0      # the default corpus only, no 1M-vector build
                                                   # (the 1M build alone took over 20 CPU-minutes on 2 cores)
    python bench/search.py --parts backends --synthetic 1000000   # usearch vs faiss-cpu (faiss-cpu installed)

Parts (`--parts`, comma-separated; each is one function `part_<name>(args) -> (rows, numbers)` in PARTS):
- index: the HNSW build (models/search_index.py's settings from params.yaml `align_index`) of the default corpus's
  vectors (paths.align_index's vectors.npy, or as many random unit vectors as items.parquet has rows, or 16,500,
  when no index exists) and of `--synthetic` random unit vectors: seconds, peak memory (the RSS of a fresh process
  that builds only that, above what it held before the build), size on disk, recall@10 against exact search;
  then single-query p50/p99 of `SearchIndex.dense` and of `SearchIndex.search(mode="hybrid")` on the default index.
- embed: the encoder's (paths.align_model) embedding throughput of code at batch 1 and 64, when an encoder exists.
- backends: the measurement behind the choice of usearch: the same builds with usearch and faiss-cpu's
  IndexHNSWFlat (inner product), at the same settings, one fresh process each.
Prints a table, and as the last line a JSON object with every number and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.search_index import VECTORS, HnswParams, SearchIndex, build_graph, top_k  # noqa: E402
from tasks.align.index import ITEMS_FILE, hnsw_params, recall_at_k  # noqa: E402
from tasks.shared.config.params import load_params  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_http import part_http  # noqa: E402

DEFAULT_ITEMS = 16_500
"""Random vectors standing in for the default corpus when neither an index nor items.parquet exists."""
RECALL_QUERIES = 1000
LATENCY_QUERIES = 300
CODE = "def read_lines(path, encoding='utf-8'):\n    with open(path, encoding=encoding) as f:\n        return f.read()"


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` random float32 unit vectors (built in place: 1M x 128 is 512 MB)."""
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int = 10) -> np.ndarray:
    """The exact top-k row ids of each query, in chunks (a 1,000 x 1M score matrix would be 4 GB)."""
    return np.concatenate([top_k(queries[i : i + 50] @ vectors.T, k)[0] for i in range(0, len(queries), 50)])


def percentiles_ms(fn, inputs: list) -> tuple[float, float]:
    """p50 and p99 wall time in milliseconds of `fn(x)` over `inputs`, after two warm-up calls."""
    fn(inputs[0]), fn(inputs[-1])
    times = []
    for x in inputs:
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return round(float(np.percentile(times, 50)) * 1000, 3), round(float(np.percentile(times, 99)) * 1000, 3)


def _graph_build(backend: str, vectors: np.ndarray, params: HnswParams, threads: int):
    """Build one backend's HNSW graph; returns (search(queries, k) -> ids, save(file))."""
    if backend == "usearch":
        graph = build_graph(vectors, params, threads)
        return (lambda q, k: np.atleast_2d(graph.search(q, k, threads=1).keys)), (lambda f: graph.save(f))
    import faiss  # optional: only this comparison needs it

    faiss.omp_set_num_threads(threads or os.cpu_count())
    graph = faiss.IndexHNSWFlat(vectors.shape[1], params.connectivity, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction, graph.hnsw.efSearch = params.ef_construction, params.ef_search
    graph.add(vectors)
    faiss.omp_set_num_threads(1)  # single queries, as serving asks them
    return (lambda q, k: graph.search(np.atleast_2d(q), k)[1]), (lambda f: faiss.write_index(graph, f))


def measure_build(backend: str, source: str | int, params: HnswParams, threads: int) -> dict:
    """In this (fresh) process: build `backend`'s graph of the vectors in `source` (a .npy file, or a count of random
    unit 128-d vectors); seconds, memory, size on disk, recall@10 vs exact, single-query latency."""
    vectors = np.load(source, allow_pickle=False) if isinstance(source, str) else unit_vectors(source, 128, seed=0)
    before = psutil.Process().memory_info().rss
    t = time.perf_counter()
    search, save = _graph_build(backend, vectors, params, threads)
    build_s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        save(str(Path(tmp) / "graph"))
        size_mb = (Path(tmp) / "graph").stat().st_size / 2**20
    queries = unit_vectors(RECALL_QUERIES, vectors.shape[1], seed=1)  # not in the corpus: other random vectors
    recall = recall_at_k(search(queries, 10), exact_top(queries, vectors))
    p50, p99 = percentiles_ms(lambda q: search(q, 10), list(queries[:LATENCY_QUERIES]))
    return {
        "backend": backend,
        "vectors": len(vectors),
        "build_s": round(build_s, 2),
        "peak_rss_mb": round(peak / 2**20),
        "build_memory_mb": round((peak - before) / 2**20),
        "size_mb": round(size_mb, 1),
        "recall_at_10": round(recall, 4),
        "query_p50_ms": p50,
        "query_p99_ms": p99,
    }


def in_fresh_process(fn, *args) -> dict:
    """`fn(*args)` in a new process, so that its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def default_vectors(paths) -> tuple[str | int, str]:
    """The default corpus's vectors (a .npy file) or how many random ones stand in for them, and which it is."""
    if (paths.align_index / VECTORS).exists():
        return str(paths.align_index / VECTORS), f"{paths.align_index / VECTORS}"
    if (paths.align_data / ITEMS_FILE).exists():
        import pandas as pd

        n = len(pd.read_parquet(paths.align_data / ITEMS_FILE, columns=["id"]))
        return n, f"random unit vectors, as many as {paths.align_data / ITEMS_FILE} (no index yet)"
    return DEFAULT_ITEMS, "random unit vectors (no index nor items yet)"


def build_rows(name: str, m: dict) -> list[tuple[str, str, str]]:
    return [
        (f"{name}: build", f"{m['build_s']:.2f} s", f"{m['vectors']:,} vectors, {m['backend']}"),
        (f"{name}: memory", f"{m['build_memory_mb']:,} MB", f"peak RSS {m['peak_rss_mb']:,} MB"),
        (f"{name}: size / recall@10", f"{m['size_mb']:.1f} MB", f"recall@10 vs exact {m['recall_at_10']:.4f}"),
        (f"{name}: query p50 / p99", f"{m['query_p50_ms']:.3f} ms", f"p99 {m['query_p99_ms']:.3f} ms"),
    ]


def query_latency(paths, encoder) -> tuple[list, dict]:
    """Single-query p50/p99 of SearchIndex.dense and SearchIndex.search(mode="hybrid") on the default index."""
    if not (paths.align_index / VECTORS).exists():
        return [("query latency", "skipped", f"no index at {paths.align_index}")], {}
    index = SearchIndex.load(paths.align_index)
    texts = index.items["snippet"].astype(str).tolist()[:LATENCY_QUERIES] if "snippet" in index.items else []
    texts = texts or ["read the lines of a file"] * LATENCY_QUERIES
    qvecs = encoder.embed(texts, "text") if encoder is not None else unit_vectors(len(texts), index.dim, seed=2)
    dense = percentiles_ms(lambda i: index.dense(qvecs[i], 10), list(range(len(texts))))
    hybrid = percentiles_ms(lambda i: index.search(texts[i], qvecs[i], 10, "hybrid"), list(range(len(texts))))
    rows = [
        ("dense p50 / p99 (1 query, k 10)", f"{dense[0]:.3f} ms", f"p99 {dense[1]:.3f} ms, {len(index):,} items"),
        ("hybrid p50 / p99 (1 query, k 10)", f"{hybrid[0]:.3f} ms", f"p99 {hybrid[1]:.3f} ms (RRF of dense, BM25)"),
    ]
    numbers = {"dense_p50_ms": dense[0], "dense_p99_ms": dense[1], "hybrid_p50_ms": hybrid[0],
               "hybrid_p99_ms": hybrid[1]}  # fmt: skip
    return rows, numbers


def load_encoder_if_any(paths, threads: int):
    """The encoder at paths.align_model, running on `threads` torch threads; None when there is none."""
    if not paths.align_model.exists():
        return None
    import torch

    from tasks.align.index import load_encoder

    torch.set_num_threads(threads)
    return load_encoder(paths.align_model)


def part_index(args, params) -> tuple[list, dict]:
    settings = hnsw_params(params.align_index)
    source, what = default_vectors(params.paths)
    default = in_fresh_process(measure_build, "usearch", source, settings, args.threads)
    rows, numbers = build_rows("default corpus", default), {"default": {**default, "vectors_from": what}}
    if args.synthetic:
        big = replace(settings, connectivity=args.synthetic_connectivity or settings.connectivity)
        big = replace(big, ef_construction=args.synthetic_ef_construction or settings.ef_construction)
        synthetic = in_fresh_process(measure_build, "usearch", args.synthetic, big, args.threads)
        rows += build_rows("synthetic", synthetic)
        numbers["synthetic"] = synthetic
    latency_rows, latency = query_latency(params.paths, load_encoder_if_any(params.paths, args.threads))
    return rows + latency_rows, {**numbers, **latency}


def part_embed(args, params) -> tuple[list, dict]:
    encoder = load_encoder_if_any(params.paths, args.threads)
    if encoder is None:
        return [("embedding", "skipped", f"no encoder at {params.paths.align_model}")], {}
    numbers = {}
    for batch in (1, 64):
        texts = [CODE] * batch
        reps = max(3, 64 // batch)
        encoder.embed(texts, "code", batch_size=batch)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            encoder.embed(texts, "code", batch_size=batch)
        numbers[f"embed_per_s_b{batch}"] = round(reps * batch / (time.perf_counter() - t), 1)
    rows = [(f"embed code, batch {b}", f"{numbers[f'embed_per_s_b{b}']:.1f} /s", "") for b in (1, 64)]
    return rows, {**numbers, "encoder_version": encoder.version}


def part_backends(args, params) -> tuple[list, dict]:
    settings = hnsw_params(params.align_index)
    sources = [DEFAULT_ITEMS] + ([args.synthetic] if args.synthetic else [])
    rows, numbers = [], {}
    for n in sources:
        for backend in ("usearch", "faiss"):
            m = in_fresh_process(measure_build, backend, n, settings, args.threads)
            rows += build_rows(f"{backend} {n:,}", m)
            numbers[f"{backend}_{n}"] = m
    return rows, numbers


PARTS = {"index": part_index, "embed": part_embed, "backends": part_backends, "http": part_http}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="index,embed", help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="random vectors of the big build (0: none)")
    parser.add_argument("--threads", type=int, default=2, help="build threads (and torch threads)")
    parser.add_argument(
        "--synthetic-connectivity", type=int, default=0, help="HNSW M of the synthetic build (0: align_index's)"
    )
    parser.add_argument(
        "--synthetic-ef-construction", type=int, default=0, help="HNSW ef_construction of the synthetic build (0: ...)"
    )
    parser.add_argument("--http-seconds", type=float, default=10.0, help="seconds per concurrency level of `http`")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    params = load_params()
    rows, numbers = [], {}
    for part in parts:
        part_rows, numbers[part] = PARTS[part](args, params)
        rows += part_rows
    for what, value, note in rows:
        print(f"{what:<36} {value:>14}  {note}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads"
    settings = asdict(hnsw_params(params.align_index))
    print(json.dumps({"machine": machine, "hnsw": settings, **numbers}))


if __name__ == "__main__":
    main()
