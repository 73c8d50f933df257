"""bench/search.py: one build measurement at a tiny size reports sane numbers, and its exact top 10 is brute force
(no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
from conftest import ROOT

from models.search_index import HnswParams

spec = importlib.util.spec_from_file_location("bench_search", ROOT / "bench" / "search.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_search"] = bench
spec.loader.exec_module(bench)


def test_a_build_measurement_reports_time_memory_size_recall_and_latency():
    m = bench.measure_build("usearch", 1500, HnswParams(), 1)
    assert m["backend"] == "usearch" and m["vectors"] == 1500
    assert m["build_s"] > 0 and m["size_mb"] > 0 and m["peak_rss_mb"] > 0 and m["build_memory_mb"] >= 0
    assert m["recall_at_10"] >= 0.98
    assert 0 < m["query_p50_ms"] <= m["query_p99_ms"]


def test_exact_top_in_chunks_is_brute_force():
    vectors, queries = bench.unit_vectors(500, 16, seed=0), bench.unit_vectors(120, 16, seed=1)
    want = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(bench.exact_top(queries, vectors), want)
