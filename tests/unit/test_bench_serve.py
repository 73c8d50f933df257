"""bench/serve_load.py's arithmetic and report on fake numbers (no server, no model, no timing asserted)."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import numpy as np
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)

METRICS = """# HELP bentoml_service_adaptive_batch_size Service adaptive batch size
# TYPE bentoml_service_adaptive_batch_size histogram
bentoml_service_adaptive_batch_size_bucket{le="1.0",method_name="classify",runner_name="lmforge",worker_index="1"} 3.0
bentoml_service_adaptive_batch_size_sum{method_name="classify",runner_name="lmforge",worker_index="1"} 40.0
bentoml_service_adaptive_batch_size_count{method_name="classify",runner_name="lmforge",worker_index="1"} 5.0
bentoml_service_adaptive_batch_size_sum{method_name="classify",runner_name="lmforge",worker_index="2"} 8.0
bentoml_service_adaptive_batch_size_count{method_name="classify",runner_name="lmforge",worker_index="2"} 1.0
bentoml_service_request_total{endpoint="/classify",http_response_code="200"} 48.0
"""


@pytest.mark.parametrize("q", [0, 50, 90, 99, 100])
def test_percentile_matches_numpy(q):
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.05]
    assert serve_load.percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert serve_load.percentile([], q) is None


def test_summarize_counts_only_good_answers_in_rps_and_latency():
    m = serve_load.summarize(
        [0.010] * 90 + [0.100] * 10,
        ["HTTP 503: busy"] * 5,
        wall_s=2.0,
        client_cpu_s=0.5,
        server_cpu_s=1.5,
        batch=(48.0, 6.0),
    )
    assert m["rps"] == 50.0
    assert m["p50_ms"] == 10.0 and m["p99_ms"] == pytest.approx(100.0)
    assert (m["errors"], m["requests"]) == (5, 105)
    assert (m["client_cpu_pct"], m["server_cpu_pct"], m["mean_batch"]) == (25.0, 75.0, 8.0)
    assert m["first_error"] == "HTTP 503: busy"


def test_summarize_with_no_good_answer():
    m = serve_load.summarize([], ["ConnectError"], wall_s=1.0, client_cpu_s=0.1)
    assert (m["rps"], m["p50_ms"], m["p99_ms"], m["server_cpu_pct"], m["mean_batch"]) == (0.0, None, None, None, None)


def test_batch_size_histogram_is_summed_over_workers():
    assert serve_load.parse_batch_metric(METRICS) == (48.0, 6.0)
    assert serve_load.parse_batch_metric("bentoml_service_request_total 3.0\n") is None


def test_closed_loop_keeps_one_request_per_client_in_flight():
    in_flight, peak = 0, 0

    async def call(text: str):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.005)
        in_flight -= 1
        if text == "bad":
            return "malformed reply"
        if text == "boom":
            raise ConnectionError("reset")
        return None

    latencies, errors, wall = asyncio.run(
        serve_load.closed_loop(call, ["ok", "ok", "bad", "boom"], concurrency=4, seconds=0.1)
    )
    assert peak == 4
    assert latencies and all(t > 0 for t in latencies)
    assert "malformed reply" in errors and "ConnectionError: reset" in errors
    assert wall >= 0.1


def test_report_has_a_row_per_level_and_json_last():
    level = serve_load.summarize([0.01] * 100, [], 1.0, 0.1, 0.9, (100.0, 10.0))
    result = {
        "inproc": {
            "32": {"rps": 400.0, "texts": 400, "seconds": 1.0, "threads": 2},
            "256": {"rps": 500.0, "texts": 512, "seconds": 1.0, "threads": 2},
        },
        "inproc_rps": 500.0,
        "concurrency": {"1": level, "8": level, "32": {**level, "rps": 400.0}},
        "grpc": {"skipped": "deploy/grpc_server.py does not exist"},
        "target_ratio": serve_load.TARGET_RATIO,
    }
    result["ratio_http32_vs_inproc"] = serve_load.ratio(result)
    assert result["ratio_http32_vs_inproc"] == 0.8
    text = serve_load.table(result)
    for row in ("in-process b=32", "in-process b=256", "http c=1", "http c=8", "http c=32", "grpc (skipped)"):
        assert row in text
    assert "(met)" in text
    json.loads(json.dumps(result))
    assert serve_load.ratio({"inproc_rps": 500.0, "concurrency": {"8": level}}) is None


def test_snippets_are_deterministic_and_valid_inputs():
    a, b = serve_load.snippets(), serve_load.snippets()
    assert a == b and len(set(a)) == len(a) and all(t.strip() for t in a)


def test_spread_gives_the_median_and_range_of_each_headline_number():
    def run(inproc: float, http: float, grpc: float, errors: int = 0) -> dict:
        r = {
            "inproc_rps": inproc,
            "concurrency": {"32": {"rps": http, "errors": errors}},
            "grpc": {"32": {"rps": grpc, "errors": 0}},
        }
        return {**r, "ratio_http32_vs_inproc": serve_load.ratio(r), "ratio_grpc32_vs_http32": serve_load.grpc_ratio(r)}

    runs = [run(1000, 800, 900), run(1200, 700, 1400, errors=2), run(900, 850, 850)]
    s = serve_load.spread(runs)
    assert s["inproc_rps"] == {"median": 1000, "min": 900, "max": 1200, "runs": [1000, 1200, 900]}
    assert (s["http32_rps"]["median"], s["grpc32_rps"]["median"]) == (800, 900)
    assert s["ratio_grpc32_vs_http32"]["min"] == 1.0 and s["ratio_grpc32_vs_http32"]["max"] == 2.0
    assert s["errors"]["max"] == 2
    assert serve_load.spread([{"inproc_rps": 5.0, "grpc": {"skipped": "no grpc"}}])["grpc32_rps"] is None
    assert "inproc_rps" in serve_load.spread_table(s) and "900–1200" in serve_load.spread_table(s)
