"""gRPC Classify batching and the server's Prometheus metrics, in-process with a tiny random classifier."""

from __future__ import annotations

import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from conftest import LABELS, tiny_corpus, tiny_labeled
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.core import classify
from deploy.grpc_server import build_server, parse_args, reserved_port
from deploy.metrics import GrpcMetrics
from deploy.resolve import ServedModel
from models.bundle import Bundle
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import tiny
from tasks.tokenize import train_tokenizer

TEXTS = list(tiny_corpus(tiny_labeled())["text"])[:48]


@pytest.fixture(scope="module")
def served():
    """A running server over a tiny random classifier, its metrics exporter's URL, and the model."""
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=2)
    torch.manual_seed(0)
    clf = TransformerClassifier(ClassifierConfig(trunk=tiny(vocab_size=tok.get_vocab_size()), labels=LABELS))
    model = ServedModel(Bundle(tok, clf, LABELS, max_length=32), uri="test-bundle", source="folder")
    metrics = GrpcMetrics()
    server, port = build_server(model, port=0, metrics=metrics)
    exporter = metrics.serve(0)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.InferenceStub(channel), f"http://127.0.0.1:{exporter.server_port}/metrics", model
    server.stop(None)
    exporter.shutdown()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the exporter's text page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_concurrent_calls_get_their_own_results_and_are_batched(served):
    stub, url, model = served
    want = [classify(model, [t])[0] for t in TEXTS]  # one text at a time, no server

    def call(text: str) -> pb.Classification:
        (result,) = stub.Classify(pb.ClassifyRequest(texts=[text]), timeout=60).results
        return result

    for _ in range(3):  # 48 calls from 16 threads: the calls queued while a batch runs form the next one
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(call, TEXTS))
        for g, w in zip(got, want):
            assert g.label == w["label"] and g.model_version == w["model_version"]
            assert dict(g.probabilities) == pytest.approx(w["probabilities"], abs=1e-5)
    samples = scrape(url)
    batches = samples[("lmforge_grpc_batch_texts_count", (("method", "Classify"),))]
    texts = samples[("lmforge_grpc_batch_texts_sum", (("method", "Classify"),))]
    assert texts == 3 * len(TEXTS) and batches < texts  # mean batch size > 1
    assert samples[("lmforge_grpc_requests_total", (("code", "OK"), ("method", "Classify")))] >= 3 * len(TEXTS)


def test_errors_are_counted_by_code(served):
    stub, url, _ = served
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(texts=[]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    samples = scrape(url)
    key = (("code", "INVALID_ARGUMENT"), ("method", "Classify"))
    assert samples[("lmforge_grpc_errors_total", key)] >= 1 and samples[("lmforge_grpc_requests_total", key)] >= 1
    assert samples[("lmforge_grpc_request_seconds_count", (("method", "Classify"),))] >= 1


def test_workers_default_to_lmforge_workers_as_rest_does(monkeypatch):
    monkeypatch.delenv("LMFORGE_WORKERS", raising=False)
    assert parse_args([]).workers == 1
    monkeypatch.setenv("LMFORGE_WORKERS", "3")
    assert parse_args([]).workers == 3
    assert parse_args(["--workers", "2"]).workers == 2
    with pytest.raises(SystemExit):
        parse_args(["--workers", "0"])


def test_workers_bind_one_reserved_port_and_a_taken_port_is_refused():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{taken.getsockname()[1]}"):
            with reserved_port("127.0.0.1", taken.getsockname()[1]):
                pass
    with reserved_port("127.0.0.1", 0) as port:  # what the parent holds while its workers bind
        servers = [build_server(None, port=port, reuse_port=True)[0] for _ in range(2)]
        with pytest.raises(OSError, match="cannot listen"):  # one process alone keeps refusing a shared port
            build_server(None, port=port)
        for server in servers:
            server.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no model: up, and says so
        for server in servers:
            server.stop(None)
