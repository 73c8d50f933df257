"""bench/attention.py: a run at tiny lengths prints both tables and a JSON last line with the issue's keys, every time
positive, every peak memory >= 0 (a step of a few kB may need no new page) and the dense mask's > 0 (no timing
asserted)."""

from __future__ import annotations

from conftest import run_bench

LENGTHS = ["64", "256"]
TIMES, MEMORY = ("dense_ms", "sparse_ms", "full_ms"), ("dense_mb", "sparse_mb", "full_mb")


def test_the_benchmark_runs_at_tiny_lengths_and_prints_its_json_last():
    args = ["--preset", "tiny", "--lengths", ",".join(LENGTHS), "--window", "16"]
    r, stdout = run_bench("attention", *args, "--warmup", "0", "--repeat", "1", "--threads", "1")
    assert r["lengths"] == [64, 256]
    for part in (r, r["block"]):
        assert all(list(part[key]) == LENGTHS for key in TIMES + MEMORY)
        assert all(v > 0 for key in TIMES for v in part[key].values()), part
        assert all(v >= 0 for key in MEMORY for v in part[key].values()), part
        assert part["dense_mb"]["256"] > 0  # the (T, T) mask and its int64 offsets: 0.5 MB at 256
        assert part["speedup_at_max"] > 0 and part["memory_ratio_at_max"] > 0 and part["sparse_growth"] > 0
        assert part["growth_from"] == 64  # 1,024 is not measured: the shortest length
        assert set(part["targets_met"]) == {"speedup", "memory", "growth"}
    assert r["settings"] | {"n_embd": 16, "n_head": 2, "window": 16, "global_tokens": 1} == r["settings"]
    assert r["machine"]["threads"] == 1 and r["machine"]["torch"]
    assert "one attention layer" in stdout and "one block" in stdout
