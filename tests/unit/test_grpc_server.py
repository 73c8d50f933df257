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
