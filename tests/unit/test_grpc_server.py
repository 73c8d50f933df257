"""The gRPC server without a model, in-process (the full tour with models: tests/integration/test_grpc.py)."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from conftest import ROOT
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.grpc_server import build_server, generation_request
from deploy.requests import GenerationRequest

STUBS = ("lmforge_pb2.py", "lmforge_pb2.pyi", "lmforge_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path):
    """deploy/lmforge_pb2*.py are what `make grpc-stubs` makes of deploy/lmforge.proto today."""
    pytest.importorskip("grpc_tools")
    out = ["--python_out", "--pyi_out", "--grpc_python_out"]
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{ROOT}",
        *(f"{o}={tmp_path}" for o in out),
        str(ROOT / "deploy" / "lmforge.proto"),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    for name in STUBS:
        assert (tmp_path / "deploy" / name).read_text() == (ROOT / "deploy" / name).read_text(), (
            f"deploy/{name} is stale: run `make grpc-stubs`"
        )


def test_unset_fields_take_the_core_defaults_and_zero_is_a_value():
    assert generation_request(pb.GenerateRequest(prompt="x")) == GenerationRequest(prompt="x")
    given = generation_request(pb.GenerateRequest(prompt="x", temperature=0, top_k=0, seed=0, stop=["\n"]))
    assert (given.temperature, given.top_k, given.seed, given.stop) == (0.0, 0, 0, ("\n",))


@pytest.fixture
def no_model():
    """A server with no model and an API key, on a free loopback port; its channel."""
    server, port = build_server(None, port=0, unavailable="models:/m@champion: alias champion not set", api_key="k")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def test_no_model_is_unavailable_with_the_reason_behind_the_api_key(no_model):
    stub = pb_grpc.InferenceStub(no_model)
    with pytest.raises(grpc.RpcError) as e:
        stub.Metadata(pb.MetadataRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.Classify(pb.ClassifyRequest(texts=["x"]), metadata=(("x-api-key", "k"),), timeout=10)
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "model unavailable: models:/m@champion: alias champion not set",
    )
    status = (
        health_pb2_grpc.HealthStub(no_model)
        .Check(health_pb2.HealthCheckRequest(service="lmforge.v1.Inference"), timeout=10)
        .status
    )
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_taken_port_is_one_line():
    server, port = build_server(None, port=0)
    server.start()
    try:
        with pytest.raises(OSError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: the port is taken"):
            build_server(None, port=port)
    finally:
        server.stop(None)


@pytest.fixture
def kg_server(tmp_path):
    """A server with no classifier but the kg task: the stand-in extractor and the graph built from small tables."""
    from conftest import make_paths
    from test_kg_graph import FakeExtractor, write_tables

    from deploy.resolve import ServedKG
    from deploy.sparql import GraphQueries
    from tasks.kg import graph
    from tasks.kg.rdf import GRAPH_FILE
    from tasks.shared.config.kg_graph import KgGraphConfig

    paths = make_paths(tmp_path)
    write_tables(paths.kg_data)
    graph.run(KgGraphConfig(), paths, extractor=FakeExtractor())
    kg = ServedKG(FakeExtractor(), paths.kg_graph / GRAPH_FILE, str(paths.kg_model), "folder")
    queries = GraphQueries(kg.graph, timeout=2.0, max_rows=3)
    server, port = build_server(None, port=0, unavailable="no classifier", kg=kg, graph=queries)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.InferenceStub(channel)
    server.stop(None)
    queries.close()


def test_extract_and_graph_query_answer_from_the_kg_task(kg_server):
    from google.protobuf import json_format

    (r,) = kg_server.Extract(pb.ExtractRequest(texts=["Raises JSONDecodeError on bad input."]), timeout=10).results
    assert [(e.text, e.link) for e in r.entities] == [("JSONDecodeError", "json.decoder.JSONDecodeError")]
    assert [(x.head, x.relation, x.tail) for x in r.relations] == [(-1, "raises", 0)]
    assert r.model_version == "lmforge-extractor/local"
    sparql = "SELECT ?f WHERE { ?f lf:raises ent:builtins.ValueError }"
    answer = json_format.MessageToDict(kg_server.GraphQuery(pb.GraphQueryRequest(sparql=sparql), timeout=10).result)
    assert [row["f"]["value"] for row in answer["rows"]] == ["https://lmforge.dev/entity/json.loads"]
    ask = kg_server.GraphQuery(pb.GraphQueryRequest(sparql="ASK { ?s lf:calls ?o }"), timeout=10).result
    assert json_format.MessageToDict(ask) == {"boolean": True}


@pytest.mark.parametrize(
    ("call", "message_in", "code", "message"),
    [
        ("Extract", pb.ExtractRequest(texts=[]), grpc.StatusCode.INVALID_ARGUMENT, "empty list"),
        ("Extract", pb.ExtractRequest(texts=["  "]), grpc.StatusCode.INVALID_ARGUMENT, "only whitespace"),
        ("Extract", pb.ExtractRequest(texts=["x"] * 65), grpc.StatusCode.INVALID_ARGUMENT, "at most 64"),
        ("Extract", pb.ExtractRequest(texts=["x" * 4001]), grpc.StatusCode.INVALID_ARGUMENT, "at most 4000"),
        ("GraphQuery", pb.GraphQueryRequest(sparql=""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (
            "GraphQuery",
            pb.GraphQueryRequest(sparql="SELECT * { SERVICE <http://example.org/s> { ?s ?p ?o } }"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "SERVICE is refused",
        ),
        (
            "GraphQuery",
            pb.GraphQueryRequest(sparql="DELETE WHERE { ?s ?p ?o }"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "read-only",
        ),
        (
            "GraphQuery",
            pb.GraphQueryRequest(sparql="SELECT (COUNT(*) AS ?n) { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "2 s limit",
        ),
        ("Classify", pb.ClassifyRequest(texts=["x"]), grpc.StatusCode.UNAVAILABLE, "no classifier"),
    ],
)
def test_kg_bad_requests_are_status_codes_with_the_reason(kg_server, call, message_in, code, message):
    with pytest.raises(grpc.RpcError) as e:
        getattr(kg_server, call)(message_in, timeout=20)
    assert e.value.code() == code and message in e.value.details()


def test_without_an_extractor_extract_and_graph_query_are_unavailable(no_model):
    stub, key = pb_grpc.InferenceStub(no_model), (("x-api-key", "k"),)
    calls = {
        "Extract": (pb.ExtractRequest(texts=["x"]), "no extractor is served"),
        "GraphQuery": (pb.GraphQueryRequest(sparql="ASK {}"), "no knowledge graph is served"),
    }
    for call, (request, message) in calls.items():
        with pytest.raises(grpc.RpcError) as e:
            getattr(stub, call)(request, metadata=key, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and message in e.value.details()
