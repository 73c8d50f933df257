"""kg scoring: span and relation micro-F1 by hand and against seqeval, linking accuracy, the document bootstrap."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.kg.baselines import fit_baselines
from tasks.kg.examples import Doc, Mention
from tasks.kg.predict import Outputs
from tasks.kg.scoring import (
    COUNTS,
    compare,
    intervals,
    per_label,
    relation_counts,
    score_outputs,
    scores,
    span_counts,
    versus,
)
from tasks.shared.stats import Resamples

ENTITIES = pd.DataFrame(
    {
        "id": ["a.Message", "b.Message", "ValueError"],
        "name": ["Message", "Message", "ValueError"],
        "kind": ["class", "class", "exception"],
        "module": ["a", "b", "builtins"],
    }
)


def test_span_counts_are_exact_match():
    gold = {(0, 5, "class"), (10, 15, "exception"), (20, 22, "parameter")}
    pred = {(0, 5, "class"), (10, 15, "class"), (30, 32, "parameter")}
    assert span_counts(gold, pred) == (1, 2, 2)


def test_relation_counts_ignore_none():
    gold = ["raises", "none", "calls", "none"]
    pred = ["raises", "calls", "none", "none"]
    assert relation_counts(gold, pred) == (1, 1, 1)


def counts(rows: list[list[int]]) -> pd.DataFrame:
    return pd.DataFrame([{"doc_id": f"d{i}", **dict(zip(COUNTS, r))} for i, r in enumerate(rows)])


def test_scores_are_micro_averaged_over_documents():
    c = counts([[2, 1, 0, 1, 0, 1, 1, 2, 3, 4], [0, 1, 2, 0, 0, 0, 1, 1, 2, 2]])
    s = scores(c)
    assert s["entity_f1"] == pytest.approx(round(2 * 2 / (2 * 2 + 2 + 2), 4))
    assert s["relation_f1"] == pytest.approx(round(2 / (2 + 0 + 1), 4))
    assert s["linking_accuracy"] == pytest.approx(round(2 / 3, 4))
    assert s["linking_accuracy_all"] == pytest.approx(round(5 / 6, 4))


def test_span_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")  # optional: not a dependency of lmforge
    gold = [["B-class", "I-class", "O", "B-exception"], ["O", "B-parameter", "O"]]
    pred = [["B-class", "I-class", "O", "B-class"], ["O", "B-parameter", "B-parameter"]]
    spans = lambda seqs: {(d, s, e, lab) for d, seq in enumerate(seqs) for s, e, lab in _spans(seq)}  # noqa: E731
    tp, fp, fn = span_counts(spans(gold), spans(pred))
    ours = scores(counts([[tp, fp, fn, 0, 0, 0, 0, 0, 0, 0]]))["entity_f1"]
    assert ours == pytest.approx(seqeval.f1_score(gold, pred, mode="strict", scheme=_iob2()), abs=1e-4)


def _iob2():
    from seqeval.scheme import IOB2

    return IOB2


def _spans(seq: list[str]):
    out, start = [], None
    for i, tag in enumerate([*seq, "O"]):
        if start is not None and not tag.startswith("I-"):
            out.append((start, i, seq[start][2:]))
            start = None
        if tag.startswith("B-"):
            start = i
    return out


def test_bootstrap_interval_contains_the_point_estimate_and_compare_is_paired():
    rng = np.random.default_rng(0)
    rows = [[*rng.integers(0, 5, 3), *rng.integers(0, 3, 3), 1, 2, 2, 3] for _ in range(60)]
    a = counts(rows)
    r = Resamples(len(a), 1000, 7)
    point, ci = scores(a), intervals(a, r)
    for k, v in point.items():
        lo, hi = ci[f"{k}_ci95"]
        assert lo <= v <= hi
    same = compare(a, a, 1000, 7)
    assert all(v["diff"] == 0 and v["p_value"] == 1.0 for v in same.values())
    worse = a.copy()
    worse["entity_tp"] = 0
    worse["entity_fn"] += a["entity_tp"]
    assert compare(worse, a, 1000, 7)["entity_f1"]["p_value"] < 0.01
    assert versus(a, worse, r)["entity_f1"]["p_value"] < 0.01
    assert versus(worse, a, r)["entity_f1"]["p_value"] == 1.0


def test_per_label_table():
    gold = [("d", 0, 3, "class"), ("d", 5, 8, "exception")]
    pred = [("d", 0, 3, "class"), ("d", 5, 8, "class")]
    t = per_label(gold, pred)
    assert t["class"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 1}
    assert t["exception"]["recall"] == 0.0


def docs() -> list[Doc]:
    text = "Raises ValueError; makes a Message"
    d1 = Doc(
        "a.py#a.f",
        text,
        "a",
        "train",
        [Mention(7, 17, "exception", "ValueError"), Mention(27, 34, "class", "a.Message")],
        [(-1, 0, "raises"), (-1, 1, "none")],
    )
    d2 = Doc(
        "b.py#b.g",
        text,
        "b",
        "train",
        [Mention(7, 17, "exception", "ValueError"), Mention(27, 34, "class", "b.Message")],
        [(-1, 0, "raises"), (-1, 1, "none")],
    )
    return [d1, d2]


def test_baselines_on_tiny_data_and_the_counts_they_give():
    train = docs()
    b = fit_baselines(train, ["none", "raises"])
    assert b.gazetteer == {"ValueError": "exception", "Message": "class"}
    assert b.tag("A ValueError, not XValueError") == [{"start": 2, "end": 12, "label": "exception"}]
    assert b.relate("Raises ValueError", (7, 17)) == "raises" and b.relate("Makes a Message", (8, 15)) == "none"
    cands = [("a.Message", "a"), ("b.Message", "b")]
    assert b.link("Message", "b", cands) == "b.Message"
    assert b.link("Message", "c", cands) in {"a.Message", "b.Message"}
    from tasks.kg.predict import baseline_outputs

    s = score_outputs(baseline_outputs(b, train, ENTITIES), train, ENTITIES)
    assert s.counts[COUNTS].sum().tolist() == [4, 0, 0, 2, 0, 0, 2, 2, 4, 4]


def test_score_outputs_counts_each_task():
    d = docs()[:1]
    out = Outputs(
        [[{"start": 7, "end": 17, "label": "exception"}]], [["raises", "raises"]], [["ValueError", "b.Message"]]
    )
    (row,) = score_outputs(out, d, ENTITIES).counts[COUNTS].to_numpy().tolist()
    assert row == [1, 0, 1, 1, 1, 0, 0, 1, 1, 2]
