"""The alignment task served end to end with a real (tiny, untrained) dual encoder and a real search index built
with it: open_search from a folder and from the registry's @champion, broken and mismatched bundles, batched search
equal to one-by-one search, gRPC, and a real `bentoml serve` fuzzed by schemathesis on /search and /embed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, free_port, post_json, start_logged, stop_server
from test_align_serving import ITEMS
from test_dual_encoder import train_tokenizer

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.core import align_batchers, embed, search
from deploy.grpc_server import build_server
from deploy.resolve import (
    ENCODER_ARTIFACT,
    ENCODER_URI_ENV,
    INDEX_ARTIFACT,
    INDEX_ENV,
    ModelUnavailable,
    open_search,
    search_folder,
)
from models.dual_encoder import DualEncoderConfig, DualEncoderNet, load_encoder, write_encoder
from models.search_index import HnswParams, SearchIndex
from models.transformer import GPT, tiny

BIN = Path(sys.executable).parent
QUERIES = ["return the message content type", "decode a json document", "join path components", "sleep a while"]
MORE = pd.DataFrame(  # documents without a qualified name, source, line or snippet: a user's corpus
    {"id": ["doc-1"], "code": ["def parse_header(line):\n    return line.split(':')"], "split": ["index"]}
)


def build_search(folder: Path) -> tuple[Path, Path]:
    """A tiny dual encoder (random trunk, its own BPE tokenizer) written as a bundle, and the index of ITEMS (plus
    one bare document) built with it: (encoder folder, index folder)."""
    tokenizer = train_tokenizer(folder / "tokenizer", ITEMS["code"].tolist() + QUERIES)
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=300, block_size=32))
    net = DualEncoderNet(DualEncoderConfig(lm.config, True, "mean", 16, 16, 32))
    net.load_trunks(lm)
    (folder / "encoder").mkdir()
    write_encoder(folder / "encoder", net, tokenizer)
    encoder = load_encoder(folder / "encoder")
    items = pd.concat([ITEMS, MORE], ignore_index=True)
    vectors = encoder.embed(items["code"].tolist(), "code")
    SearchIndex.build(vectors, items, encoder.version, HnswParams()).save(folder / "index")
    return folder / "encoder", folder / "index"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    return build_search(tmp_path_factory.mktemp("align-serving"))


@pytest.fixture
def clean_env(monkeypatch):
    for name in (ENCODER_URI_ENV, INDEX_ENV, "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def test_a_folder_and_its_index_are_served(bundle, clean_env, monkeypatch):
    encoder_dir, index_dir = bundle
    monkeypatch.setenv(ENCODER_URI_ENV, str(encoder_dir))
    monkeypatch.setenv(INDEX_ENV, str(index_dir))
    served = open_search()
    assert (served.source, served.served_mode, served.model_version) == ("folder", "hybrid", "lmforge-encoder/local")
    meta = served.metadata()
    assert meta["encoder_sha256"] == served.encoder.version == meta["index"]["encoder_sha256"]
    assert (meta["index"]["backend"], meta["index"]["items"], meta["dim"]) == ("usearch", 5, 16)
    assert meta["index"]["size_mb"] > 0 and meta["index"]["params"]["hnsw"]["ef_search"] == 256
    (bm25,) = search(served, ["join path"], k=2, mode="bm25")
    assert bm25["results"][0]["qualname"] == "os.path.join" and bm25["results"][0]["line"] == 71
    (dense,) = search(served, ["anything"], k=100, mode="dense")
    assert sorted(h["id"] for h in dense["results"]) == sorted([*ITEMS["id"], "doc-1"])  # k past the items: all
    doc = next(h for h in dense["results"] if h["id"] == "doc-1")
    assert (doc["qualname"], doc["source"], doc["line"], doc["snippet"]) == ("doc-1", "", 0, "")
    (hybrid,) = search(served, ["parse a header line"], k=3)
    assert hybrid["mode"] == "hybrid" and len(hybrid["results"]) == 3
    vectors = np.asarray(embed(served, ["decode json", "def f(): pass"], "code")["vectors"])
    assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # the served code tower gives the very vectors the index holds
    item = embed(served, [ITEMS["code"][0]], "code")["vectors"][0]
    np.testing.assert_allclose(item, served.index.vectors[0], atol=1e-5)


def test_the_champion_of_the_registry_is_served_with_its_mode(bundle, clean_env, mlflow_db, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    encoder_dir, index_dir = bundle
    source = tmp_path / "version"
    shutil.copytree(encoder_dir, source / ENCODER_ARTIFACT)
    shutil.copytree(index_dir, source / INDEX_ARTIFACT)
    client = MlflowClient(tracking_uri=mlflow_db, registry_uri=mlflow_db)
    client.create_registered_model("lmforge-encoder")
    mv = client.create_model_version("lmforge-encoder", source=str(source), tags={"served_mode": "dense"})
    client.set_registered_model_alias("lmforge-encoder", "champion", mv.version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    served = open_search()
    assert (served.source, served.version, served.served_mode) == ("registry", "1", "dense")
    (out,) = search(served, ["decode json"], k=2)
    assert out["mode"] == "dense" and out["model_version"] == "lmforge-encoder/1"
    client.set_model_version_tag("lmforge-encoder", mv.version, "served_mode", "fuzzy")
    with pytest.raises(ModelUnavailable, match="tag served_mode='fuzzy' is not one of dense, bm25, hybrid"):
        open_search()


def test_a_broken_encoder_a_missing_index_and_another_encoders_index_are_one_line(
    bundle, clean_env, monkeypatch, tmp_path
):
    encoder_dir, index_dir = bundle
    broken = tmp_path / "broken"
    shutil.copytree(encoder_dir, broken)
    weights = broken / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setenv(ENCODER_URI_ENV, str(broken))
    monkeypatch.setenv(INDEX_ENV, str(index_dir))
    with pytest.raises(ModelUnavailable, match=rf"^{ENCODER_URI_ENV}=.*broken: encoder.safetensors: "):
        open_search()
    monkeypatch.setenv(ENCODER_URI_ENV, str(encoder_dir))
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "no-index"))
    with pytest.raises(ModelUnavailable, match="no index folder .*no-index"):
        open_search()
    other = SearchIndex.load(index_dir)
    other.meta["encoder_version"] = "0" * 64
    SearchIndex(other.graph, other.vectors, other.items, other.bm25, other.meta).save(tmp_path / "other")
    monkeypatch.setenv(INDEX_ENV, str(tmp_path / "other"))
    with pytest.raises(ModelUnavailable, match="the index was built with encoder 000000000000, not this one"):
        open_search()


def test_concurrent_searches_are_batched_and_answer_as_one_by_one(bundle):
    served = search_folder(*bundle)
    alone = [search(served, [q], k=3)[0] for q in QUERIES]
    forwards = []
    embed_ = served.encoder.embed
    served.encoder.embed = lambda texts, kind, batch_size=64: (forwards.append(len(texts)), embed_(texts, kind))[1]
    searches, _ = align_batchers(served, 64)
    start = threading.Barrier(len(QUERIES) * 4)
    answers: dict[int, dict] = {}

    def ask(i: int) -> None:
        start.wait()
        (answers[i],) = searches.submit((3, None), [QUERIES[i % len(QUERIES)]]).result(30)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUERIES) * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in answers.items():
        want = alone[i % len(QUERIES)]
        assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
        np.testing.assert_allclose([h["score"] for h in got["results"]], [h["score"] for h in want["results"]])
    assert sum(forwards) == 16 and len(forwards) < 16  # fewer forward passes than requests
    searches.close()


def test_grpc_search_and_embed_with_the_real_encoder(bundle):
    served = search_folder(*bundle)
    server, port = build_server(None, port=0, unavailable="no classifier", align=served)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceStub(channel)
            r = stub.Search(pb.SearchRequest(query="join path", k=1, mode="bm25"), timeout=30)
            assert [(h.qualname, h.source, h.line) for h in r.results] == [("os.path.join", "posixpath.py", 71)]
            e = stub.Embed(pb.EmbedRequest(texts=["decode json"], kind="text"), timeout=30)
            want = served.encoder.embed(["decode json"], "text")[0]
            np.testing.assert_allclose(e.vectors[0].values, want, atol=1e-6)
    finally:
        server.stop(None)


def _search_ready(base: str, proc, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"bentoml serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base}/livez", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"bentoml serve not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_a_real_server_answers_search_and_embed_and_schemathesis_finds_no_server_error(bundle, tmp_path):
    """`bentoml serve` with the encoder folder and no classifier; schemathesis fuzzes /search and /embed."""
    encoder_dir, index_dir = bundle
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMFORGE_", "MLFLOW_"))}
    env.update(
        {
            ENCODER_URI_ENV: str(encoder_dir),
            INDEX_ENV: str(index_dir),
            "LMFORGE_MODEL_URI": str(tmp_path / "no-classifier"),
            "LMFORGE_EXTRACTOR_URI": "off",
            "BENTOML_HOME": str(tmp_path / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
        }
    )
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [str(BIN / "bentoml"), "serve", "deploy.service:LMForge", "--port", str(port)]
    proc = start_logged(cmd, ROOT, env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        _search_ready(base, proc, log)
        status, body = post_json(f"{base}/search", {"query": "join path components", "k": 2, "mode": "bm25"})
        assert status == 200 and body["results"][0]["qualname"] == "os.path.join", body
        status, body = post_json(f"{base}/embed", {"texts": ["decode json"], "kind": "text"})
        assert status == 200 and body["dim"] == 16 and len(body["vectors"][0]) == 16, body
        assert post_json(f"{base}/search", {"query": "x", "k": 101})[0] == 400
        res = subprocess.run(
            [
                str(BIN / "st"),
                "run",
                f"{base}/docs.json",
                "--include-path-regex",
                "^/(search|embed)$",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "30",
                "--seed",
                "1",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stdout[-4000:]
        assert "No issues found" in res.stdout, res.stdout[-3000:]
        assert "Selected: 2/13" in res.stdout and "Tested: 2" in res.stdout, res.stdout[-3000:]  # /search, /embed
    finally:
        stop_server(proc)
    text = log.read_text()
    assert "status=5" not in text and "Traceback" not in text, text[-3000:]
