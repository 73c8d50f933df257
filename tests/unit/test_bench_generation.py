"""bench/generation.py: one end-to-end run on a tiny saved LM prints its table and a JSON last line with the
issue's keys, cached and uncached outputs identical across the block_size boundary (no timing asserted)."""

from __future__ import annotations

import torch
from conftest import run_bench

from models.checkpoint import save_lm
from models.transformer import GPT, tiny


def test_the_benchmark_runs_on_a_saved_lm_and_prints_its_json_last(tmp_path):
    torch.manual_seed(0)
    save_lm(GPT(tiny(vocab_size=64, pos_encoding="rope", attn_window=9)), tmp_path / "lm")
    args = ["--lm", str(tmp_path / "lm"), "--new-tokens", "40", "--prompt-tokens", "5"]
    r, stdout = run_bench("generation", *args, "--repeat", "1", "--threads", "1", "--no-long")
    assert (r["prompt_tokens"], r["new_tokens"], r["identical"], r["threads"]) == (5, 40, True, 1)
    assert min(r["cached_tokens_per_s"], r["uncached_tokens_per_s"], r["previous_tokens_per_s"]) > 0
    assert "long_context" not in r
    assert r["model"]["block_size"] == 32 and r["model"]["source"] == str(tmp_path / "lm")  # 45 > 32: a shift
    assert stdout.split()[:2] == ["model", "block"] and "outputs identical" in stdout
