"""evaluate's long/short split: which test rows are long, macro-F1 on each part with its interval, and every
variant against the `short` baseline (the 128-token model) on each part, on tiny hand-made predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from models.tokenizer import LONG_TOKENS, token_counts
from tasks.evaluate import (
    TABLE_COLUMNS,
    EvaluateResult,
    LengthPart,
    add_length_scores,
    add_uncertainty,
    compare_by_length,
    length_lines,
    length_parts,
    length_scores,
    markdown_report,
    table,
)
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.stats import Resamples, paired

LABELS = ["a", "b", "c"]
CFG = EvaluateConfig(bootstrap_resamples=1000, seed=7)
LENGTH_KEYS = {"macro_f1_long", "macro_f1_long_ci95", "macro_f1_short", "macro_f1_short_ci95"}


def _rows(n: int = 120, seed: int = 0):
    """Labels, token counts (every other row long) and predictions of a model right on 80% of the rows."""
    rng = np.random.default_rng(seed)
    y = rng.choice(LABELS, n).tolist()
    counts = [LONG_TOKENS + 1 + i if i % 2 else LONG_TOKENS - i % 100 for i in range(n)]
    good = [t if rng.random() < 0.8 else rng.choice(LABELS) for t in y]
    return y, counts, good


def test_long_rows_have_more_than_long_tokens_and_the_rest_are_short():
    parts = length_parts([5, LONG_TOKENS, LONG_TOKENS + 1, 900, 0], CFG)
    assert [p.name for p in parts] == ["long", "short"]
    assert parts[0].rows.tolist() == [2, 3] and parts[1].rows.tolist() == [0, 1, 4]
    assert parts[0].resamples == Resamples(2, CFG.bootstrap_resamples, CFG.seed)
    assert [p.name for p in length_parts([3, 4], CFG)] == ["short"]  # no long row: no long part


def test_token_counts_are_untruncated():
    class Tok:  # the tokenizers API: encode_batch -> objects with .ids
        def encode_batch(self, texts):
            return [type("E", (), {"ids": list(range(len(t.split())))}) for t in texts]

    assert token_counts(Tok(), ["a b c", "x " * 500, ""]) == [3, 500, 0]


def test_length_scores_are_macro_f1_on_each_part_with_an_interval():
    y, counts, pred = _rows()
    parts = length_parts(counts, CFG)
    got = length_scores(y, pred, LABELS, parts)
    assert set(got) == LENGTH_KEYS
    for part in parts:
        rows = part.rows
        want = f1_score([y[i] for i in rows], [pred[i] for i in rows], labels=LABELS, average="macro", zero_division=0)
        assert got[f"macro_f1_{part.name}"] == pytest.approx(want, abs=1e-4)
        lo, hi = got[f"macro_f1_{part.name}_ci95"]
        assert lo <= got[f"macro_f1_{part.name}"] <= hi and hi - lo > 0


def test_a_label_absent_from_a_part_does_not_count_there():
    y = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "a", "b", "a", "c", "c"]
    part = LengthPart("long", np.array([0, 1, 2, 3]), Resamples(4, 50, 0))  # no `c` row among the long ones
    got = length_scores(y, pred, LABELS, [part])
    assert got["macro_f1_long"] == pytest.approx(
        f1_score(y[:4], pred[:4], labels=["a", "b"], average="macro"), abs=1e-4
    )
    assert got["macro_f1_short"] is None and got["macro_f1_short_ci95"] is None


def test_every_variant_against_the_short_baseline_on_each_part_is_the_paired_comparison():
    y, counts, good = _rows()
    short = [p if c <= LONG_TOKENS else "a" for p, c in zip(good, counts)]  # as good on short rows, blind on long
    preds = {"fp32": good, "int8": good, "short": short}
    parts = length_parts(counts, CFG)
    got = compare_by_length(y, preds, LABELS, ["fp32", "int8"], parts)
    assert set(got) == {"fp32", "int8"} and set(got["fp32"]) == {"long", "short"}
    for part in parts:
        want = paired(part.take(y), part.take(good), part.take(short), LABELS, part.resamples).as_dict()
        assert got["fp32"][part.name] == want
    assert got["fp32"]["long"]["macro_f1_diff"] > 0.2 and got["fp32"]["long"]["p_f1_better"] < 0.01
    assert got["fp32"]["short"]["macro_f1_diff"] == 0 and got["fp32"]["short"]["rows"] == len(parts[1].rows)
    assert compare_by_length(y, {"fp32": good}, LABELS, ["fp32"], parts) == {}  # no `short` baseline: no block


def test_the_length_keys_reach_every_model_the_table_and_the_report():
    y, counts, good = _rows()
    preds = {"fp32": good, "majority": ["a"] * len(y), "short": good, "cnn": good[::-1]}
    results = {n: {"accuracy": 0.5, "macro_f1": 0.5} for n in preds}
    parts = length_parts(counts, CFG)
    versus = add_uncertainty(results, preds, {}, LABELS, y, {"fp32"}, CFG)
    by_length = add_length_scores(results, preds, {}, LABELS, y, parts)
    assert all(LENGTH_KEYS <= set(m) for m in results.values())
    assert set(results["fp32"]["vs_short"]) == {"long", "short"} and "vs_short" not in results["short"]
    assert set(versus["fp32"]) == {"short", "cnn"}  # `short` is a trained baseline like the others
    assert {"macro_f1_long", "macro_f1_long_ci95", "macro_f1_short", "macro_f1_short_ci95"} <= set(TABLE_COLUMNS)
    cols = table(results, {"fp32"})
    lo, hi = results["fp32"]["macro_f1_long_ci95"]
    assert cols["macro_f1_long_ci95"][0] == f"{lo:.4f}–{hi:.4f}"
    rows = {"test": len(y), "long": len(parts[0].rows), "short": len(parts[1].rows)}
    report = markdown_report(cols, ["fp32"], {}, {}, {}, rows, length_lines(by_length))
    assert f"`macro_f1_long`: on the {rows['long']} texts of more than {LONG_TOKENS} tokens" in report
    assert "| fp32 | long | 60 |" in report and "| fp32 | short | 60 |" in report
    assert length_lines({}) == []


def test_evaluate_json_has_the_length_counts():
    fields = set(EvaluateResult.__dataclass_fields__)
    assert {"test_examples", "test_examples_long", "test_examples_short", "long_tokens"} <= fields


def test_timed_adds_batch_one_latency_on_the_long_texts_only_when_given():
    from tasks.shared.scoring import Scorer, timed

    seen: list[int] = []

    def forward(enc):
        seen.append(max(len(t) for t in enc))
        return np.ones((len(enc), 2)) / 2

    scorers = {"m": Scorer(["a", "b"], lambda texts: texts, forward)}
    cfg = EvaluateConfig(latency_samples=4, latency_batches=2)
    plain = timed(scorers, ["x"] * 40, cfg)["m"]
    assert "p50_ms_b1_long" not in plain and plain["p50_ms_b1"] > 0
    seen.clear()
    out = timed(scorers, ["x"] * 40, cfg, ["y" * 500] * 3)["m"]
    assert {"p50_ms_b1_long", "p99_ms_b1_long", "tokenize_ms_b1_long", "forward_ms_b1_long"} <= set(out)
    assert out["p50_ms_b1_long"] > 0 and seen.count(500) >= cfg.latency_samples  # timed on the long texts
