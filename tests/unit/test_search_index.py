"""models/search_index.py: the HNSW index against exact search, BM25, hybrid fusion, the saved folder (round trip,
no pickle, a missing or corrupt file named), and the align_index stage on tiny items with a stand-in encoder."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pandas as pd
import pytest
from conftest import make_paths

from models.errors import ArtifactError
from models.search_index import (
    BM25_DIR,
    GRAPH,
    ITEMS,
    META,
    VECTORS,
    HnswParams,
    SearchIndex,
    lexical_tokens,
    reciprocal_rank_fusion,
)
from tasks.align import index as stage
from tasks.shared.config.align_index import AlignIndexConfig

SETTINGS = HnswParams(
    **{k: AlignIndexConfig().model_dump()[k] for k in ("connectivity", "ef_construction", "ef_search")}
)
"""The shipped defaults (params.yaml shows the same)."""


class HashedWords:
    """Stand-in encoder with models/dual_encoder.py's interface: unit bag-of-words vectors, words hashed to `dim`
    buckets; the same for both towers, so a query shares a direction with the code that uses its words."""

    version = "hashedwords0001"

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.calls: list[tuple[str, int, int]] = []

    def embed(self, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
        self.calls.append((kind, len(texts), batch_size))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in lexical_tokens(text):
                out[row, int(hashlib.sha256(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1.0)


CODES = [
    "def get_event_loop(policy=None):\n    return policy.loop",
    "def read_lines(path):\n    return open(path).read().splitlines()",
    "def parse_json(text):\n    return json.loads(text)",
    "def send_mail(host, message):\n    smtp = SMTP(host)\n    smtp.send(message)",
    "def compress_bytes(data, level=9):\n    return zlib.compress(data, level)",
    "def sort_records(records, key):\n    return sorted(records, key=key)",
    "def format_date(when):\n    return when.strftime('%Y-%m-%d')",
    "def hash_password(password, salt):\n    return sha256(salt + password)",
]


def make_items(codes: list[str]) -> pd.DataFrame:
    names = [c.split("(")[0].removeprefix("def ") for c in codes]
    return pd.DataFrame(
        {
            "id": [f"mod.py#{n}" for n in names],
            "code": codes,
            "qualname": [f"mod.{n}" for n in names],
            "source": "mod.py",
            "line": np.arange(1, len(codes) + 1) * 10,
            "snippet": [c.splitlines()[0] for c in codes],
            "split": ["test" if i % 2 else "train" for i in range(len(codes))],
        }
    )


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small() -> SearchIndex:
    encoder = HashedWords()
    items = make_items(CODES)
    return SearchIndex.build(encoder.embed(CODES, "code"), items, encoder.version, SETTINGS)


@pytest.fixture(scope="module")
def random_index() -> SearchIndex:
    """2,000 random unit vectors (no structure: the hardest case for a graph index)."""
    vectors = unit_vectors(2000, 64, seed=0)
    items = pd.DataFrame({"id": [str(i) for i in range(2000)], "code": [f"item {i}" for i in range(2000)]})
    return SearchIndex.build(vectors, items, "random", SETTINGS)


def test_exact_search_is_brute_force(random_index):
    queries = unit_vectors(20, 64, seed=1)
    ids, scores = random_index.exact(queries, 10)
    brute = queries @ random_index.vectors.T
    for row in range(len(queries)):
        want = np.argsort(-brute[row], kind="stable")[:10]
        np.testing.assert_array_equal(ids[row], want)
        np.testing.assert_allclose(scores[row], brute[row, want], rtol=1e-6)


def test_ann_recall_at_10_on_random_vectors_is_at_least_0_98_at_the_default_settings(random_index):
    queries = unit_vectors(200, 64, seed=2)
    assert stage.index_recall(random_index, queries) >= 0.98


def test_dense_scores_are_cosines_best_first_and_k_is_capped_at_the_item_count(small):
    q = HashedWords().embed(["parse json text"], "text")
    ids, scores = small.dense(q, 50)
    assert ids.shape == (1, len(CODES)) and sorted(ids[0].tolist()) == list(range(len(CODES)))
    assert ids[0, 0] == 2
    np.testing.assert_allclose(scores[0], (small.vectors[ids[0]] @ q[0]), atol=1e-5)
    assert np.all(np.diff(scores[0]) <= 1e-6)


def test_lexical_ranks_the_item_with_the_query_s_exact_words_first_and_marks_no_match(small):
    ids, scores = small.lexical(["compress these bytes", "nothing matches xyzzy"], 3)
    assert ids[0, 0] == 4 and scores[0, 0] > 0
    assert ids[1].tolist() == [-1, -1, -1] and scores[1].tolist() == [0.0, 0.0, 0.0]


def test_identifiers_match_the_words_of_a_query():
    assert lexical_tokens("getEventLoop get_event_loop HTTPServer v2") == [
        "get", "event", "loop", "get", "event", "loop", "http", "server", "v", "2",
    ]  # fmt: skip


def test_hybrid_is_the_rank_fusion_of_dense_and_bm25(small):
    query = "send a message by mail"
    qvec = HashedWords().embed([query], "text")
    dense_ids, _ = small.dense(qvec, 100)
    bm25_ids, _ = small.lexical([query], 100)
    want_ids, want_scores = reciprocal_rank_fusion([dense_ids[0], bm25_ids[0][bm25_ids[0] >= 0]], top=5)
    hits = small.search(query, qvec, 5, "hybrid")
    assert [h["id"] for h in hits] == small.items["id"].iloc[want_ids].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], want_scores)
    assert hits[0] == {"id": "mod.py#send_mail", "score": hits[0]["score"], "qualname": "mod.send_mail",
                       "source": "mod.py", "line": 40, "snippet": "def send_mail(host, message):"}  # fmt: skip


def test_search_modes_and_their_needs(small):
    qvec = HashedWords().embed(["hash a password"], "text")
    assert small.search("hash a password", None, 2, "bm25")[0]["qualname"] == "mod.hash_password"
    assert small.search("", qvec, 2, "dense")[0]["qualname"] == "mod.hash_password"
    with pytest.raises(ValueError, match="needs the query's vector"):
        small.search("hash a password", None, 2, "hybrid")
    with pytest.raises(ValueError, match="mode 'sparse'"):
        small.search("hash a password", qvec, 2, "sparse")


def test_save_and_load_give_the_same_results_without_pickle(small, tmp_path, monkeypatch):
    small.save(tmp_path / "index", extra={"index_recall_at_10": 1.0})
    assert not [p for p in (tmp_path / "index").rglob("*") if p.suffix in (".pkl", ".pickle")]

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = SearchIndex.load(tmp_path / "index")
    q = HashedWords().embed(["read the lines of a file", "format a date"], "text")
    for method in ("dense", "exact"):
        for a, b in zip(getattr(small, method)(q, 5), getattr(loaded, method)(q, 5)):
            np.testing.assert_allclose(a, b)
    np.testing.assert_array_equal(small.lexical(["read lines"], 5)[0], loaded.lexical(["read lines"], 5)[0])
    assert loaded.search("read lines", q[:1], 3, "hybrid") == small.search("read lines", q[:1], 3, "hybrid")
    pd.testing.assert_frame_equal(loaded.items, small.items)
    meta = json.loads((tmp_path / "index" / META).read_text())
    assert meta["encoder_version"] == "hashedwords0001" and meta["backend"] == "usearch" and meta["items"] == 8
    assert meta["params"]["hnsw"] == {"connectivity": 32, "ef_construction": 128, "ef_search": 256}
    assert meta["extra"] == {"index_recall_at_10": 1.0} and loaded.params.ef_search == SETTINGS.ef_search


@pytest.mark.parametrize("name", [GRAPH, VECTORS, ITEMS, f"{BM25_DIR}/vocab.index.json", META])
def test_a_missing_file_is_an_artifact_error_naming_it(small, tmp_path, name):
    small.save(tmp_path / "index")
    (tmp_path / "index" / name).unlink()
    with pytest.raises(ArtifactError, match="missing") as e:
        SearchIndex.load(tmp_path / "index")
    assert e.value.file == tmp_path / "index" / name


@pytest.mark.parametrize("name", [GRAPH, VECTORS, ITEMS, f"{BM25_DIR}/data.csc.index.npy"])
def test_a_corrupt_or_truncated_file_is_an_artifact_error_naming_it(small, tmp_path, name):
    small.save(tmp_path / "index")
    f = tmp_path / "index" / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(data)
    with pytest.raises(ArtifactError, match="corrupt") as e:
        SearchIndex.load(tmp_path / "index")
    assert e.value.file == f
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        SearchIndex.load(tmp_path / "index")


def test_a_bad_index_json_is_an_artifact_error(small, tmp_path):
    small.save(tmp_path / "index")
    (tmp_path / "index" / META).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        SearchIndex.load(tmp_path / "index")


def test_the_stage_embeds_builds_measures_and_saves(tmp_path):
    paths = make_paths(tmp_path)
    paths.align_data.mkdir(parents=True)
    items = make_items(CODES)
    items.to_parquet(paths.align_data / stage.ITEMS_FILE)
    pairs = pd.DataFrame({"query": ["Parse JSON text.", "Sort the records."], "split": ["test", "train"]})
    pairs.to_parquet(paths.align_data / stage.PAIRS_FILE)
    encoder = HashedWords()
    result = stage.run(AlignIndexConfig(batch_size=4, recall_sample=5), paths, encoder=encoder)
    assert encoder.calls == [("code", 8, 4), ("text", 1, 4)]
    m = result.metrics
    assert m["items"] == 8 and m["dim"] == 64 and m["backend"] == "usearch"
    assert m["index_recall_at_10"] == m["index_recall_at_10_items"] == m["index_recall_at_10_queries"] == 1.0
    assert m["index_size_mb"] > 0 and m["index_build_s"] >= 0 and m["encoder_version"] == "hashedwords0001"
    loaded = SearchIndex.load(paths.align_index)
    assert loaded.meta["extra"]["index_recall_at_10"] == 1.0
    assert loaded.search("parse json", None, 1, "bm25")[0]["id"] == "mod.py#parse_json"


def test_recall_at_k_is_the_share_of_the_exact_top_k_found():
    assert stage.recall_at_k(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[3, 2, 1], [4, 7, 8]])) == pytest.approx(
        (1 + 1 / 3) / 2
    )
