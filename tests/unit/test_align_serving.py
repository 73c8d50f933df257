"""Serving the alignment task with stand-ins for the encoder and the index: the limits, the batcher that merges
concurrent searches, the core's search and embed, gRPC's Search and Embed, and which encoder open_search finds.
(REST /search and /embed: tests/unit/test_service.py; with a real encoder and index: test_align_serving_e2e.py.)"""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pandas as pd
import pytest

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.batching import Batcher
from deploy.core import AlignUnavailable, embed, search
from deploy.grpc_server import build_server
from deploy.requests import LIMITS, InvalidInput, check_embed, check_search
from deploy.resolve import ENCODER_URI_ENV, INDEX_ENV, ModelUnavailable, ServedSearch, open_search
from models.search_index import lexical_tokens, reciprocal_rank_fusion

ITEMS = pd.DataFrame(
    {
        "id": ["json.loads", "email.message.Message.get_content_type", "os.path.join", "asyncio.sleep"],
        "code": [
            "def loads(s):\n    return decode_json(s)",
            "def get_content_type(self):\n    return self.get('content-type', 'text/plain')",
            "def join(a, *p):\n    return sep.join([a, *p])",
            "async def sleep(delay):\n    await loop_sleep(delay)",
        ],
        "qualname": ["json.loads", "email.message.Message.get_content_type", "os.path.join", "asyncio.sleep"],
        "source": ["json/__init__.py", "email/message.py", "posixpath.py", "asyncio/tasks.py"],
        "line": [299, 588, 71, 637],
        "snippet": [
            "def loads(s):",
            "def get_content_type(self):",
            "def join(a, *p):",
            "async def sleep(delay):",
        ],
        "split": ["test"] * 4,
    }
)


class StandInEncoder:
    """Hashed bag of words (the spec's stand-in until models/dual_encoder.py lands); records its batch sizes."""

    dim = 32
    version = hashlib.sha256(b"stand-in").hexdigest()

    def __init__(self) -> None:
        self.batches: list[int] = []

    def embed(self, texts: list[str], kind: str, batch_size: int = 64) -> np.ndarray:
        assert kind in ("text", "code")
        self.batches.append(len(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in lexical_tokens(t) or ["empty"]:
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class StandInIndex:
    """Exact search over the items' code vectors, word overlap for bm25, their fusion for hybrid."""

    backend = "exact"
    metric = "cos"

    def __init__(self, encoder: StandInEncoder, items: pd.DataFrame = ITEMS) -> None:
        self.items, self.encoder_version = items, encoder.version
        self.vectors = encoder.embed(items["code"].tolist(), "code")
        encoder.batches.clear()

    def _ranked(self, query: str, qvec: np.ndarray | None, mode: str) -> tuple[np.ndarray, np.ndarray]:
        words = set(lexical_tokens(query))
        overlap = np.array([len(words & set(lexical_tokens(c))) for c in self.items["code"]], dtype=np.float64)
        if mode == "bm25":
            order = np.argsort(-overlap, kind="stable")
            return order, overlap[order]
        dense = self.vectors @ qvec
        order = np.argsort(-dense, kind="stable")
        if mode == "dense":
            return order, dense[order]
        return reciprocal_rank_fusion([order, np.argsort(-overlap, kind="stable")])

    def search(self, query: str, qvec: np.ndarray | None, k: int, mode: str) -> list[dict]:
        order, scores = self._ranked(query, qvec, mode)
        rows = self.items.iloc[order[:k]]
        return [
            {**{c: r[c] for c in ("id", "qualname", "source", "line", "snippet")}, "score": s}
            for (_, r), s in zip(rows.iterrows(), scores[:k])
        ]


def stand_in(mode: str = "hybrid") -> ServedSearch:
    encoder = StandInEncoder()
    return ServedSearch(encoder, StandInIndex(encoder), "stand-in", "folder", served_mode=mode)


# --- the limits ----------------------------------------------------------------------------------------

BAD = {
    "blank query": (lambda: check_search(" ", 10, None), "query: empty"),
    "long query": (lambda: check_search("a" * (LIMITS.max_query_chars + 1), 10, None), "at most 2000"),
    "k 0": (lambda: check_search("x", 0, None), "k: 0, must be an integer 1..100"),
    "k 101": (lambda: check_search("x", 101, None), "k: 101, must be an integer 1..100"),
    "k bool": (lambda: check_search("x", True, None), "k: True"),
    "mode": (lambda: check_search("x", 1, "fuzzy"), "mode: 'fuzzy', must be one of dense, bm25, hybrid"),
    "kind": (lambda: check_embed(["x"], "image"), "kind: 'image', must be one of text, code"),
    "no texts": (lambda: check_embed([], "text"), "texts: empty list"),
    "many texts": (lambda: check_embed(["x"] * 65, "code"), "65 items, at most 64"),
    "long text": (lambda: check_embed(["x" * 20_001], "code"), "at most 20000"),
}


@pytest.mark.parametrize("case", BAD)
def test_requests_outside_the_limits_name_the_field_and_bound(case):
    call, message = BAD[case]
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(".", r"\.")):
        call()


def test_requests_inside_the_limits_pass_unchanged():
    assert check_search("parse json", 100, None) == ("parse json", 100, None)
    assert check_embed(["a", "b"], "code") == (["a", "b"], "code")


# --- the batcher ---------------------------------------------------------------------------------------


def test_the_batcher_merges_calls_queued_meanwhile_with_the_same_key():
    gate, seen = threading.Event(), []

    def run(key, items):
        if not seen:
            gate.wait(10)  # the first batch holds the worker while the others queue
        seen.append((key, list(items)))
        return [f"{key}:{x}" for x in items]

    batcher = Batcher(run, max_items=3)
    first = batcher.submit("a", [0])
    time.sleep(0.05)
    calls = [batcher.submit("a", [1, 2]), batcher.submit("b", [3]), batcher.submit("a", [4]), batcher.submit("a", [5])]
    gate.set()
    assert first.result(10) == ["a:0"]
    assert [c.result(10) for c in calls] == [["a:1", "a:2"], ["b:3"], ["a:4"], ["a:5"]]
    # a's calls that waited ran as one batch (three items at most), b's alone, in arrival order
    assert seen == [("a", [0]), ("a", [1, 2, 4]), ("b", [3]), ("a", [5])]
    assert (batcher.batches, batcher.batched_items) == (4, 6)
    batcher.close()


def test_an_error_reaches_every_caller_of_its_batch_and_the_worker_goes_on():
    def run(key, items):
        if key == "bad":
            raise AlignUnavailable("no encoder")
        return items

    batcher = Batcher(run, max_items=8)
    with pytest.raises(AlignUnavailable, match="no encoder"):
        batcher.submit("bad", [1]).result(10)
    assert batcher.submit("ok", [2]).result(10) == [2]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("ok", [3])


# --- the core --------------------------------------------------------------------------------------------


def test_search_ranks_by_each_mode_and_embeds_the_queries_in_one_batch():
    served = stand_in("dense")
    out = search(served, ["return the message content type", "decode json"], k=2)
    assert [r["mode"] for r in out] == ["dense", "dense"] and served.encoder.batches == [2]
    assert out[0]["results"][0]["qualname"] == "email.message.Message.get_content_type"
    assert out[1]["results"][0]["id"] == "json.loads" and len(out[1]["results"]) == 2
    hit = out[1]["results"][0]
    assert set(hit) == {"id", "score", "qualname", "source", "line", "snippet"} and type(hit["line"]) is int
    assert out[0]["model_version"] == "lmforge-encoder/local"
    (bm25,) = search(served, ["join path"], k=4, mode="bm25")
    assert bm25["mode"] == "bm25" and bm25["results"][0]["id"] == "os.path.join" and served.encoder.batches == [2]
    (hybrid,) = search(served, ["sleep for a delay"], k=1, mode="hybrid")
    assert hybrid["results"][0]["id"] == "asyncio.sleep"


def test_embed_gives_unit_vectors_of_the_tower_asked_for():
    out = embed(stand_in(), ["parse json", "def loads(s): ..."], "code")
    vectors = np.asarray(out["vectors"])
    assert vectors.shape == (2, out["dim"]) == (2, StandInEncoder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(AlignUnavailable, match="no encoder is served"):
        embed(None, ["x"], "text")


# --- gRPC ------------------------------------------------------------------------------------------------


@pytest.fixture
def stub():
    """A gRPC server with no classifier but the stand-in encoder and index."""
    server, port = build_server(None, port=0, unavailable="no classifier", align=stand_in())
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.InferenceStub(channel)
    server.stop(None)


def test_grpc_search_and_embed_answer_from_the_same_core(stub):
    r = stub.Search(pb.SearchRequest(query="decode json"), timeout=10)
    assert r.mode == "hybrid" and len(r.results) == 4 and r.results[0].id == "json.loads"
    assert (r.results[0].source, r.results[0].line, r.results[0].snippet) == ("json/__init__.py", 299, "def loads(s):")
    assert r.model_version == "lmforge-encoder/local"
    r = stub.Search(pb.SearchRequest(query="join path", k=1, mode="bm25"), timeout=10)
    assert [h.qualname for h in r.results] == ["os.path.join"] and r.mode == "bm25"
    e = stub.Embed(pb.EmbedRequest(texts=["a", "b c"], kind="text"), timeout=10)
    assert e.dim == StandInEncoder.dim and len(e.vectors) == 2 and len(e.vectors[0].values) == e.dim


@pytest.mark.parametrize(
    ("call", "request_", "message"),
    [
        ("Search", pb.SearchRequest(query=" "), "query: empty"),
        ("Search", pb.SearchRequest(query="x", k=0), "k: 0, must be an integer 1..100"),
        ("Search", pb.SearchRequest(query="x", k=101), "k: 101"),
        ("Search", pb.SearchRequest(query="x", mode="fuzzy"), "mode: 'fuzzy'"),
        ("Embed", pb.EmbedRequest(texts=["x"]), "kind: '', must be one of text, code"),
        ("Embed", pb.EmbedRequest(texts=[], kind="code"), "texts: empty list"),
        ("Embed", pb.EmbedRequest(texts=["x"] * 65, kind="code"), "at most 64"),
    ],
)
def test_grpc_requests_outside_the_limits_are_invalid_argument(stub, call, request_, message):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stub, call)(request_, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_grpc_without_an_encoder_search_and_embed_are_unavailable():
    server, port = build_server(None, port=0, unavailable="no classifier")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            for call, request in (
                ("Search", pb.SearchRequest(query="x")),
                ("Embed", pb.EmbedRequest(texts=["x"], kind="text")),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, call)(request, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "no encoder is served" in e.value.details()
    finally:
        server.stop(None)


# --- which encoder -----------------------------------------------------------------------------------------


def test_open_search_off_missing_folder_and_no_encoder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENCODER_URI_ENV, "off")
    assert open_search() is None
    monkeypatch.setenv(ENCODER_URI_ENV, str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailable, match=rf"^{ENCODER_URI_ENV}=.*nope: no such folder or model URI$"):
        open_search()
    monkeypatch.delenv(ENCODER_URI_ENV)
    monkeypatch.delenv(INDEX_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no params.yaml, no registry, no workspace: nothing to serve
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}")
    assert open_search() is None


def test_metadata_names_the_encoder_the_index_and_the_mode():
    meta = stand_in("dense").metadata()
    assert meta["encoder_sha256"] == StandInEncoder.version and meta["served_mode"] == "dense"
    assert meta["index"] == {
        "backend": "exact",
        "items": 4,
        "size_mb": None,
        "params": None,
        "encoder_sha256": StandInEncoder.version,
    }
    assert meta["model_version"] == "lmforge-encoder/local" and meta["dim"] == StandInEncoder.dim
