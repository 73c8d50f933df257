"""align_evaluate: retrieval ranks and metrics, the paired bootstrap, the hybrid, zero-shot labels, align.json's keys.

The encoder is a stand-in (hashed bag of words): the scores here test the evaluation, not a model.
"""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from models.search_index import lexical_tokens, reciprocal_rank_fusion
from tasks.align.evaluate import (
    ALIGN_KEYS,
    align_metrics,
    evaluate,
    index_figures,
    label_metrics,
    report,
    served_choice,
)
from tasks.align.labels import DESCRIPTIONS, description
from tasks.align.retrieval import (
    bm25_scores,
    compare_encoders,
    fused_ranks,
    gold_ranks,
    paired_difference,
    per_query,
    query_pool,
    ranking,
    system_metrics,
    tfidf_scores,
    with_interval,
)
from tasks.shared.config.align_evaluate import AlignEvaluateConfig
from tasks.shared.errors import UserError
from tasks.shared.stats import Resamples


class BagOfWords:
    """A stand-in encoder: L2-normalised hashed counts of `lexical_tokens`, the same for both kinds."""

    def __init__(self, dim: int = 512, int8: bool = False) -> None:
        self.dim, self.int8 = dim, int8
        self.version = "int8-bow" if int8 else "bow"

    def embed(self, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
        assert kind in ("text", "code")
        v = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in lexical_tokens(t):
                v[i, zlib.crc32(w.encode()) % self.dim] += 1
        if self.int8:
            v = np.round(v / max(v.max(), 1) * 127)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)

    def quantized(self) -> "BagOfWords":
        return BagOfWords(self.dim, int8=True)

    def size_mb(self) -> float:
        return self.dim * 4 / 2**20 / (4 if self.int8 else 1)


FUNCTIONS = [  # (id, docstring query, code)
    ("a.py:open_file", "Open a file for reading.", "def open_file(path):\n    return open(path, 'r')"),
    ("a.py:close_socket", "Close the network socket.", "def close_socket(sock):\n    sock.close()"),
    ("a.py:parse_json", "Parse a json string.", "def parse_json(text):\n    return json.loads(text)"),
    ("b.py:sort_items", "Sort the items by key.", "def sort_items(items, key):\n    return sorted(items, key=key)"),
    ("b.py:hash_bytes", "Hash some bytes with sha256.", "def hash_bytes(data):\n    return sha256(data)"),
    ("b.py:count_words", "Count words in a line.", "def count_words(line):\n    return len(line.split())"),
]


def tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """pairs.parquet and items.parquet of six test functions, one train pair and one test item without a pair."""
    rows = [dict(id=i, text=q, query=q, code=c, qualname=i, module="m", source=i[:4]) for i, q, c in FUNCTIONS]
    pairs = pd.DataFrame(rows).assign(split="test")
    train = dict(id="t.py:f", text="Train.", query="Train.", code="def f(): pass", qualname="f", module="t")
    pairs = pd.concat([pairs, pd.DataFrame([{**train, "source": "t.py", "split": "train"}])], ignore_index=True)
    items = pairs[["id", "code", "qualname", "source", "split"]].copy()
    extra = dict(id="b.py:undocumented", code="def undocumented(x):\n    return x", qualname="u", source="b.py")
    items = pd.concat([items, pd.DataFrame([{**extra, "split": "test"}])], ignore_index=True)
    return pairs, items.assign(line=1, snippet=items["code"].str.split("\n").str[0])


def labeled() -> pd.DataFrame:
    """A labeled set of functions whose words are those of their label's description."""
    rows = []
    for split, n in (("train", 4), ("test", 3)):
        for label in ("asyncio", "xml"):
            words = DESCRIPTIONS[label].replace(",", "").split()
            texts = [f"def f{i}():\n    {' '.join(words[i:])}" for i in range(n)]
            rows += [{"text": t, "label": label, "split": split} for t in texts]
    return pd.DataFrame(rows).assign(id=lambda d: [f"x{i}" for i in range(len(d))], source="s.py")


def test_gold_rank_counts_ties_against_the_gold():
    scores = np.array([[0.9, 0.5, 0.1], [0.5, 0.5, 0.1], [0.0, 0.0, 0.0], [0.2, 0.3, 0.9]])
    assert gold_ranks(scores, np.array([1, 0, 2, 2])).tolist() == [2, 2, 3, 1]


def test_ranking_is_best_first_with_the_gold_after_its_ties():
    scores = np.array([[0.5, 0.5, 0.5, 0.9], [0.1, 0.7, 0.3, 0.2]])
    assert ranking(scores, np.array([0, 3]), 3).tolist() == [[3, 1, 2], [1, 2, 3]]
    # the gold's position in the full ranking is its rank
    order = ranking(scores, np.array([0, 3]), 4)
    assert [list(o).index(g) + 1 for o, g in zip(order, [0, 3])] == gold_ranks(scores, np.array([0, 3])).tolist()


def test_recall_and_mrr_from_ranks():
    values = per_query(np.array([1.0, 3.0, 20.0, np.inf]))
    assert values["recall_at_1"].tolist() == [1, 0, 0, 0]
    assert values["recall_at_10"].tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(values["mrr"], [1, 1 / 3, 1 / 20, 0])
    m = system_metrics(np.array([1.0, 3.0, 20.0, np.inf]), Resamples(4, 200, 0).indices(), "bm25_")
    assert m["bm25_recall_at_10"] == 0.5 and m["bm25_mrr"] == round((1 + 1 / 3 + 1 / 20) / 4, 4)
    assert set(m) == {f"bm25_{k}{s}" for k in ("recall_at_1", "recall_at_10", "mrr") for s in ("", "_ci95")}


def test_bootstrap_interval_contains_the_estimate_and_differences_are_paired():
    rng = np.random.default_rng(0)
    a = rng.random(300)
    idx = Resamples(300, 1000, 7).indices()
    mean, (lo, hi) = with_interval(a, idx)
    assert lo < mean < hi and mean == round(float(a.mean()), 4)
    # b = a + 0.1 on every query: paired, the difference has no spread; unpaired it would be as wide as a's interval
    diff, ci = paired_difference(a, a + 0.1, idx)
    assert diff == -0.1 and ci == [-0.1, -0.1]
    b = a + rng.normal(0.05, 0.01, 300)
    diff, (dlo, dhi) = paired_difference(b, a, idx)
    assert dlo < diff < dhi and dhi - dlo < (hi - lo) / 3


def test_hybrid_is_reciprocal_rank_fusion_of_both_rankings():
    dense, lexical = np.array([[0, 1, 2], [4, 3, 2]]), np.array([[2, 1, 0], [5, 6, 7]])
    ranks, top = fused_ranks(dense, lexical, np.array([1, 9]))
    ids, _ = reciprocal_rank_fusion([dense[0], lexical[0]])
    assert ids.tolist() == [0, 2, 1] and ranks[0] == 3  # 1/61 + 1/63 > 2/62
    assert top[0, :3].tolist() == [0, 2, 1] and (top[0, 3:] == -1).all()
    assert np.isinf(ranks[1])  # in neither list: not retrieved
    ranks, _ = fused_ranks(np.array([[0, 1]]), np.array([[1, 2]]), np.array([1]))
    assert ranks.tolist() == [1]


def test_tied_fused_scores_count_against_the_gold():
    ranks, _ = fused_ranks(np.array([[0, 1]]), np.array([[1, 0]]), np.array([0]))
    assert ranks.tolist() == [2]


def test_lexical_baselines_find_the_function_named_by_the_query():
    codes = [c for *_, c in FUNCTIONS]
    queries = ["parse json", "close socket", "zzz unknown", ""]
    for scores in (bm25_scores(codes, queries, 1.5, 0.75), tfidf_scores(codes, queries)):
        assert scores.shape == (4, 6)
        assert scores[:2].argmax(1).tolist() == [2, 1]
        assert not scores[2:].any()  # no known token: every item scores 0 (and the gold gets the worst rank)


def test_zero_shot_picks_the_nearest_label_description():
    metrics = label_metrics(BagOfWords(), labeled(), AlignEvaluateConfig(bootstrap_resamples=100))
    assert metrics["zero_shot_accuracy"] == 1.0 and metrics["zero_shot_macro_f1"] == 1.0
    assert metrics["linear_probe_accuracy"] == 1.0
    lo, hi = metrics["zero_shot_accuracy_ci95"]
    assert lo <= 1.0 <= hi
    assert description("mypackage") == "code from the mypackage package"


def test_no_labeled_test_rows_gives_nulls_not_zeros():
    data = labeled().assign(split="train")
    metrics = label_metrics(BagOfWords(), data, AlignEvaluateConfig())
    assert metrics["zero_shot_accuracy"] is None and metrics["linear_probe_macro_f1_ci95"] is None


def test_evaluate_scores_every_system_and_align_json_has_every_key(tmp_path):
    pairs, items = tables()
    pool = query_pool(pairs, items, tmp_path)
    metrics, table = evaluate(BagOfWords(), pool, labeled(), AlignEvaluateConfig(bootstrap_resamples=100))
    (tmp_path / "index.json").write_text(json.dumps({"encoder_version": "bow", "extra": {"index_recall_at_10": 1.0}}))
    with pytest.raises(UserError, match="index_build_s"):
        index_figures(tmp_path, "bow")
    meta = {"encoder_version": "bow", "extra": {"index_recall_at_10": 0.99, "index_build_s": 0.1}}
    (tmp_path / "index.json").write_text(json.dumps(meta))
    figures = index_figures(tmp_path, "bow")
    assert figures["index_recall_at_10"] == 0.99 and figures["index_size_mb"] == 0.0  # a 1 kB folder
    metrics |= figures | {"encoder_sha256": "e", "index_sha256": "i"}
    metrics |= served_choice(BagOfWords(), pool, AlignEvaluateConfig())
    out = align_metrics(metrics)
    assert set(ALIGN_KEYS) <= set(out)
    assert {k.removesuffix("_ci95") for k in out} == set(ALIGN_KEYS)
    assert metrics["queries"] == 6 and metrics["pool"] == 7 and metrics["encoder_version"] == "bow"
    assert metrics["mrr"] == 1.0 and metrics["code_to_text_mrr"] == 1.0  # each query names its function
    assert metrics["served_mode"] == "hybrid"  # every mode finds each function first here: a tie goes to the hybrid
    assert served_choice(BagOfWords(), None, AlignEvaluateConfig())["served_mode"] == "hybrid"
    assert metrics["int8_size_mb"] < metrics["encoder_size_mb"]
    assert len(table) == 6 * 6 and set(table["system"]) == {"dense", "code_to_text", "bm25", "tfidf", "hybrid", "int8"}
    dense = table[table["system"] == "dense"]
    assert (dense["gold_rank"] == 1).all() and [t[0] for t in dense["top10"]] == list(dense["query_id"])
    assert "| hybrid |" in report(metrics)


def test_index_meta_must_exist_and_come_from_the_same_encoder(tmp_path):
    with pytest.raises(UserError, match="align_index"):
        index_figures(tmp_path, "bow")
    (tmp_path / "index.json").write_text("{")
    with pytest.raises(UserError, match="not JSON"):
        index_figures(tmp_path, "bow")
    (tmp_path / "index.json").write_text(json.dumps({"encoder_version": "other"}))
    with pytest.raises(UserError, match="rerun align_index"):
        index_figures(tmp_path, "bow")


def test_a_test_pair_without_its_item_is_an_error():
    pairs, items = tables()
    with pytest.raises(UserError, match="no test item"):
        query_pool(pairs, items[items["id"] != "a.py:open_file"], "data")


def test_compare_encoders_pairs_the_two_encoders_on_the_same_queries(tmp_path):
    pairs, items = tables()
    pairs.to_parquet(tmp_path / "pairs.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    paths = SimpleNamespace(align_data=tmp_path)
    cfg = AlignEvaluateConfig(bootstrap_resamples=200)
    ids = [i for i, *_ in FUNCTIONS]
    same = compare_encoders(BagOfWords(), BagOfWords(), paths, ids, cfg)
    assert same == {"candidate": 1.0, "champion": 1.0, "diff": 0.0, "ci95": [0.0, 0.0], "queries": 6}
    worse = compare_encoders(BagOfWords(dim=1), BagOfWords(), paths, ids[:4], cfg)  # one bucket: every item ties
    assert worse["queries"] == 4 and worse["candidate"] == round(1 / 7, 4)
    assert worse["diff"] < 0 and worse["ci95"][1] < 0
    with pytest.raises(UserError, match="none of the 1 queries"):
        compare_encoders(BagOfWords(), BagOfWords(), paths, ["t.py:f"], cfg)  # a train pair
