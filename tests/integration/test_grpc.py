"""The gRPC server as a client meets it: real server processes on loopback, a real grpcio client.

Three servers boot at once, one per module: `good` (`python -m deploy.grpc_server` on a causal-LM bundle),
`keyed` (`lmforge serve --grpc` on a masked-LM bundle with LMFORGE_API_KEY set: the CLI path, the API
key and the model that cannot generate) and `missing` (LMFORGE_MODEL_URI names no folder: it must stay
up, say NOT_SERVING and answer UNAVAILABLE with the reason). The bundles are built here in seconds from
the synthetic corpus (an LM fit for a few steps, so that greedy text is ASCII); what they predict does not
matter, only that both front ends answer the same way (deploy/core.py).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from conftest import LABELS, ROOT, free_port, start_logged, stop_group, tiny_corpus, tiny_labeled
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.requests import LIMITS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = "s3cret-key"
TEXTS = [
    "def net_socket_send(self, packet, host=None):\n    return self.proxy.send(packet)",
    "def db_cursor_query(self, table, row=None):\n    return self.schema.commit(row)",
    "def ui_widget_render(self, window, color=None):\n    return self.canvas.layout(color)",
]
PROMPT = "def net_socket_recv(self, "


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    """`good/` (causal LM: can generate) and `masked/` (bidirectional LM: cannot) bundle folders."""
    from models import checkpoint as ckpt
    from models.bundle import write_bundle
    from models.classifier import ClassifierConfig, TransformerClassifier
    from models.tokenizer import TOKENIZER_FILE
    from models.transformer import GPT, tiny
    from tasks.tokenize import train_tokenizer

    root = tmp_path_factory.mktemp("grpc-bundles")
    texts = list(tiny_corpus(tiny_labeled())["text"])
    tok = train_tokenizer(texts, vocab_size=512, min_frequency=2)
    tok.save(str(root / TOKENIZER_FILE))
    vocab = tok.get_vocab_size()
    ids = torch.tensor([i for t in texts for i in tok.encode(t).ids])
    torch.manual_seed(0)
    lm = GPT(tiny(vocab_size=vocab))
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(25):  # a few steps: enough for ASCII code-like text, not for anything better
        starts = torch.randint(0, len(ids) - 33, (16,))
        x, y = torch.stack([ids[s : s + 32] for s in starts]), torch.stack([ids[s + 1 : s + 33] for s in starts])
        loss = lm(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt.save_lm(lm.eval(), root / "parts" / "lm")
    ckpt.save_lm(GPT(tiny(vocab_size=vocab, causal=False)).eval(), root / "parts" / "mlm")
    clf = TransformerClassifier(ClassifierConfig(trunk=tiny(vocab_size=vocab), labels=LABELS)).eval()
    ckpt.save_classifier(clf, root / "parts" / "classifier", extra={"max_length": 32})
    write_bundle(root / "good", root / TOKENIZER_FILE, root / "parts" / "classifier", root / "parts" / "lm")
    write_bundle(root / "masked", root / TOKENIZER_FILE, root / "parts" / "classifier", root / "parts" / "mlm")
    return root


@dataclass
class Server:
    proc: object
    port: int
    log: Path
    channel: grpc.Channel | None = None

    @property
    def inference(self) -> pb_grpc.InferenceStub:
        return pb_grpc.InferenceStub(self.channel)

    def wait_line(self, text: str, timeout: float = 10) -> str:
        """The server's log once it contains `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.log.read_text()


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_MODEL_URI", "LMFORGE_API_KEY")}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}


def _ready(server: Server, timeout: float = 120) -> None:
    """Until the server accepts connections; fails with its log if it exits or time runs out."""
    server.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    deadline = time.monotonic() + timeout
    while True:
        assert server.proc.poll() is None, (
            f"{server.proc.args} exited {server.proc.returncode}:\n{server.log.read_text()[-3000:]}"
        )
        try:
            grpc.channel_ready_future(server.channel).result(timeout=1)
            return
        except grpc.FutureTimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no gRPC server on port {server.port} after {timeout} s:\n{server.log.read_text()[-3000:]}"
                ) from None


@pytest.fixture(scope="module")
def servers(bundles, tmp_path_factory):
    """`good`, `keyed` and `missing`, started together and stopped after the module."""
    logs = tmp_path_factory.mktemp("grpc-logs")
    server = [sys.executable, "-m", "deploy.grpc_server", "--port"]
    specs = {
        "good": (server, _env(LMFORGE_MODEL_URI=str(bundles / "good"))),
        "keyed": (
            [sys.executable, "-m", "tasks.ops.cli", "serve", "--grpc", "--port"],
            _env(LMFORGE_MODEL_URI=str(bundles / "masked"), LMFORGE_API_KEY=KEY),
        ),
        "missing": (server, _env(LMFORGE_MODEL_URI="/nonexistent/bundle")),
    }
    started = {}
    try:
        for name, (cmd, env) in specs.items():
            port = free_port()
            started[name] = Server(
                start_logged(cmd + [str(port)], ROOT, env, logs / f"{name}.log"), port, logs / f"{name}.log"
            )
        for s in started.values():
            _ready(s)
        yield started
    finally:
        for s in started.values():
            if s.channel is not None:
                s.channel.close()
            stop_group(s.proc)


@pytest.fixture(scope="module")
def good(servers) -> Server:
    return servers["good"]


def _error(call, *args, **kwargs) -> grpc.RpcError:
    """The error a call ends with (a stream's at its first message)."""
    with pytest.raises(grpc.RpcError) as e:
        reply = call(*args, timeout=30, **kwargs)
        if hasattr(reply, "__next__"):
            list(reply)
    return e.value


def _health(server: Server, service: str = "", metadata=()) -> int:
    return (
        health_pb2_grpc.HealthStub(server.channel)
        .Check(health_pb2.HealthCheckRequest(service=service), timeout=10, metadata=metadata)
        .status
    )


# --- a served model ------------------------------------------------------------------------------


def test_start_up_says_what_it_serves_and_where(good, bundles):
    log = good.wait_line("serving")
    assert (
        f"lmforge: gRPC on 127.0.0.1:{good.port}: serving {bundles / 'good'}: "
        f"fp32 classifier over {len(LABELS)} labels, with /generate"
    ) in log


def test_classify(good):
    reply = good.inference.Classify(pb.ClassifyRequest(texts=TEXTS), timeout=30)
    assert len(reply.results) == len(TEXTS)
    for r in reply.results:
        assert sorted(r.probabilities) == LABELS
        assert math.isclose(sum(r.probabilities.values()), 1.0, abs_tol=1e-4)
        assert r.label == max(r.probabilities, key=r.probabilities.get)
        assert r.model_version == "lmforge-classifier/local"


def test_classify_is_thread_safe(good):
    """Concurrent calls on the server's thread pool give what one call at a time gives."""
    one_by_one = [good.inference.Classify(pb.ClassifyRequest(texts=[t]), timeout=30).results[0] for t in TEXTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda i: good.inference.Classify(pb.ClassifyRequest(texts=[TEXTS[i % 3]]), timeout=30).results[0],
                range(24),
            )
        )
    for i, r in enumerate(together):
        assert r == one_by_one[i % 3]


def test_the_largest_valid_request_fits(good):
    """256 texts of 20,000 characters (5 MB, over gRPC's default 4 MB limit)."""
    texts = [
        (TEXTS[i % 3] + "\n") * (LIMITS.max_text_chars // (len(TEXTS[i % 3]) + 1)) for i in range(LIMITS.max_items)
    ]
    assert sum(map(len, texts)) > 4 * 2**20
    reply = good.inference.Classify(pb.ClassifyRequest(texts=texts), timeout=60)
    assert len(reply.results) == LIMITS.max_items


def test_generate_with_a_seed_is_repeatable(good):
    req = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=24, seed=7)
    a, b = good.inference.Generate(req, timeout=30), good.inference.Generate(req, timeout=30)
    assert a == b
    assert a.model_version == "lmforge-classifier/local"
    assert a.finish_reason in ("length", "eos") and 0 < a.tokens <= 24
    assert (
        a.text != good.inference.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=24, seed=8), timeout=30).text
    )


def test_temperature_zero_is_greedy_and_stop_strings_cut(good):
    greedy = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=32, temperature=0)
    a, b = good.inference.Generate(greedy, timeout=30), good.inference.Generate(greedy, timeout=30)
    assert (
        a.text == b.text and a.tokens == 32 and a.finish_reason == "length"
    )  # no seed, yet the same: 0 really is greedy
    stop = next(
        c for c in a.text[4:] if c.isascii() and not c.isspace()
    )  # a character that appears after the first few
    cut = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=32, temperature=0, stop=["\x00never", stop])
    reply = good.inference.Generate(cut, timeout=30)
    assert (reply.text, reply.finish_reason) == (a.text[: a.text.index(stop)], "stop")


def test_stream_is_generate_in_pieces(good):
    req = pb.GenerateRequest(prompt=PROMPT, max_new_tokens=40, seed=3, top_k=20, top_p=0.9)
    whole = good.inference.Generate(req, timeout=30)
    chunks = list(good.inference.GenerateStream(req, timeout=30))
    assert len(chunks) > 2
    assert "".join(c.text for c in chunks) == whole.text
    last = chunks[-1]
    assert (last.finish_reason, last.tokens, last.model_version) == (
        whole.finish_reason,
        whole.tokens,
        whole.model_version,
    )
    assert all(not c.finish_reason for c in chunks[:-1])


def test_metadata(good, bundles):
    reply = good.inference.Metadata(pb.MetadataRequest(), timeout=30)
    assert (reply.registered_model, reply.version, reply.model_version, reply.variant) == (
        "lmforge-classifier",
        "local",
        "lmforge-classifier/local",
        "fp32",
    )
    assert list(reply.labels) == LABELS and reply.can_generate
    doc = reply.metadata
    assert doc["source"] == "folder" and doc["model_uri"] == str(bundles / "good") and doc["can_generate"] is True
    assert doc["labels"] == LABELS and "lineage" in doc and "metrics" in doc


def test_health_says_serving(good):
    for service in ("", "lmforge.v1.Inference"):
        assert _health(good, service) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        _health(good, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_services(good):
    stub = reflection_pb2_grpc.ServerReflectionStub(good.channel)

    def ask(**kw):
        return next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)]), timeout=10)))

    names = {s.name for s in ask(list_services="").list_services_response.service}
    assert {"lmforge.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    described = ask(file_containing_symbol="lmforge.v1.Inference").file_descriptor_response.file_descriptor_proto
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in described]
    assert {"deploy/lmforge.proto", "google/protobuf/struct.proto"} <= {
        f.name for f in files
    }  # what grpcurl needs, dependencies included


# Each: the RPC, its request, the start of the INVALID_ARGUMENT message (deploy/core.py's words, as REST's 400s).
INVALID = {
    "no-texts": ("Classify", pb.ClassifyRequest(texts=[]), "texts: empty list"),
    "blank-text": ("Classify", pb.ClassifyRequest(texts=["ok", " \n\t"]), "texts[1]: empty or only whitespace"),
    "long-text": (
        "Classify",
        pb.ClassifyRequest(texts=["x" * (LIMITS.max_text_chars + 1)]),
        f"texts[0]: {LIMITS.max_text_chars + 1} characters, at most",
    ),
    "many-texts": (
        "Classify",
        pb.ClassifyRequest(texts=["x"] * (LIMITS.max_items + 1)),
        f"texts: {LIMITS.max_items + 1} items, at most {LIMITS.max_items}",
    ),
    "blank-prompt": ("Generate", pb.GenerateRequest(prompt="  "), "prompt: empty"),
    "long-prompt": (
        "Generate",
        pb.GenerateRequest(prompt="x" * (LIMITS.max_prompt_chars + 1)),
        f"prompt: {LIMITS.max_prompt_chars + 1} characters",
    ),
    "no-tokens": ("Generate", pb.GenerateRequest(prompt=PROMPT, max_new_tokens=0), "max_new_tokens: 0, must be 1..256"),
    "many-tokens": (
        "Generate",
        pb.GenerateRequest(prompt=PROMPT, max_new_tokens=LIMITS.max_new_tokens + 1),
        "max_new_tokens: 257, must be 1..256",
    ),
    "top-p-zero": ("Generate", pb.GenerateRequest(prompt=PROMPT, top_p=0), "top_p: 0"),
    "top-k-big": ("Generate", pb.GenerateRequest(prompt=PROMPT, top_k=LIMITS.max_top_k + 1), "top_k: 1001"),
    "many-stops": (
        "Generate",
        pb.GenerateRequest(prompt=PROMPT, stop=["a"] * (LIMITS.max_stop + 1)),
        f"stop: at most {LIMITS.max_stop} strings",
    ),
    "empty-stop": ("Generate", pb.GenerateRequest(prompt=PROMPT, stop=[""]), "stop[0]: must be a non-empty string"),
    "negative-temperature": (
        "Generate",
        pb.GenerateRequest(prompt=PROMPT, temperature=-0.5),
        "temperature: -0.5, must be 0..2",
    ),
    "nan-temperature": (
        "Generate",
        pb.GenerateRequest(prompt=PROMPT, temperature=float("nan")),
        "temperature: expected a number",
    ),
    "huge-seed": ("Generate", pb.GenerateRequest(prompt=PROMPT, seed=2**63), "seed: 9223372036854775808"),
    "stream": ("GenerateStream", pb.GenerateRequest(prompt=PROMPT, max_new_tokens=0), "max_new_tokens: 0"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_is_invalid_argument_with_the_reason(good, case):
    rpc, request, message = INVALID[case]
    e = _error(getattr(good.inference, rpc), request)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    assert e.details().startswith(message), e.details()
    assert "\n" not in e.details()


# --- API key, a model that cannot generate --------------------------------------------------------


def test_api_key_is_required_except_for_health_and_reflection(servers):
    keyed = servers["keyed"]
    for metadata in (
        (),
        (("authorization", "Bearer wrong"),),
        (("x-api-key", "wrong"),),
        (("authorization", f"Bearer {KEY}x"),),
    ):
        for call, request in (
            (keyed.inference.Classify, pb.ClassifyRequest(texts=TEXTS)),
            (keyed.inference.GenerateStream, pb.GenerateRequest(prompt=PROMPT)),
        ):
            e = _error(call, request, metadata=metadata)
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, e.code(), e.details())
            assert "LMFORGE_API_KEY is set on the server" in e.details()
    for metadata in ((("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),)):
        assert len(
            keyed.inference.Classify(pb.ClassifyRequest(texts=TEXTS), metadata=metadata, timeout=30).results
        ) == len(TEXTS)
    assert _health(keyed) == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(keyed.channel)
    reply = next(
        iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    )
    assert "lmforge.v1.Inference" in {s.name for s in reply.list_services_response.service}


def test_a_masked_lm_cannot_generate(servers):
    keyed, metadata = servers["keyed"], (("x-api-key", KEY),)
    assert not keyed.inference.Metadata(pb.MetadataRequest(), metadata=metadata, timeout=30).can_generate
    for call in (keyed.inference.Generate, keyed.inference.GenerateStream):
        e = _error(call, pb.GenerateRequest(prompt=PROMPT), metadata=metadata)
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert e.details() == "the served model was pretrained as a masked LM and cannot generate text"


def test_lmforge_serve_grpc_checks_the_model_first(servers, bundles):
    log = servers["keyed"].wait_line("gRPC on")
    assert (
        f"serving {bundles / 'masked'}: fp32 classifier over {len(LABELS)} labels, no /generate" in log
    )  # the CLI's preflight, then the server's line


# --- no model: up, NOT_SERVING, UNAVAILABLE with the reason ---------------------------------------


def test_without_a_model_the_server_stays_up_and_says_why(servers):
    missing = servers["missing"]
    reason = "model unavailable: LMFORGE_MODEL_URI=/nonexistent/bundle: no such folder or model URI"
    assert "no model to serve, answering UNAVAILABLE: LMFORGE_MODEL_URI=/nonexistent/bundle" in missing.wait_line(
        "UNAVAILABLE"
    )
    for service in ("", "lmforge.v1.Inference"):
        assert _health(missing, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    calls = (
        (missing.inference.Classify, pb.ClassifyRequest(texts=TEXTS)),
        (missing.inference.Generate, pb.GenerateRequest(prompt=PROMPT)),
        (missing.inference.GenerateStream, pb.GenerateRequest(prompt=PROMPT)),
        (missing.inference.Metadata, pb.MetadataRequest()),
    )
    for call, request in calls:
        e = _error(call, request)
        assert (e.code(), e.details()) == (grpc.StatusCode.UNAVAILABLE, reason)
    assert missing.proc.poll() is None


def test_sigterm_stops_the_server_cleanly(servers):
    missing = servers["missing"]
    os.killpg(missing.proc.pid, signal.SIGTERM)
    assert missing.proc.wait(timeout=30) == 0
    assert f"lmforge: gRPC on 127.0.0.1:{missing.port}: stopped" in missing.log.read_text()


# --- several worker processes ---------------------------------------------------------------------


def test_workers_share_the_port_sum_their_metrics_and_stop_with_the_parent(bundles, tmp_path):
    """`--workers 2`: two processes serve one port, /metrics (the parent's) counts every call once, and SIGTERM
    to the parent alone stops both workers and removes the metrics folder."""
    port, metrics_port, tmp = free_port(), free_port(), tmp_path / "tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "deploy.grpc_server", "--port", str(port), "--workers", "2"]
    env = _env(LMFORGE_MODEL_URI=str(bundles / "good"), TMPDIR=str(tmp))
    server = Server(
        start_logged([*cmd, "--metrics-port", str(metrics_port)], ROOT, env, tmp_path / "w.log"),
        port,
        tmp_path / "w.log",
    )
    try:
        _ready(server)
        deadline = time.monotonic() + 120
        while (log := server.log.read_text()).count(": serving ") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.count(": serving ") == 2, log  # both workers loaded the model and listen
        pids = [int(p) for p in log.split("worker processes (pids ")[1].split(")")[0].split(", ")]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
        assert len(list(tmp.glob("lmforge-grpc-metrics-*"))) == 1
        want = server.inference.Classify(pb.ClassifyRequest(texts=TEXTS), timeout=30)
        for _ in range(11):  # a channel per call: new connections, spread over the workers by the kernel
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                got = pb_grpc.InferenceStub(channel).Classify(pb.ClassifyRequest(texts=TEXTS), timeout=30)
                for g, w in zip(got.results, want.results, strict=True):
                    assert g.label == w.label and dict(g.probabilities) == pytest.approx(dict(w.probabilities))
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.read().decode())
                for s in family.samples
            }
        assert samples[("lmforge_grpc_requests_total", (("code", "OK"), ("method", "Classify")))] == 12
        assert samples[("lmforge_grpc_batch_texts_sum", (("method", "Classify"),))] == 12 * len(TEXTS)
        server.channel.close()
        server.proc.send_signal(signal.SIGTERM)  # the parent only: it must stop its workers itself
        assert server.proc.wait(timeout=60) == 0
        assert not [p for p in pids if Path(f"/proc/{p}").exists()]
        assert list(tmp.glob("lmforge-grpc-metrics-*")) == []  # the parent removed the workers' metric files
        assert f"lmforge: gRPC on 127.0.0.1:{port}: stopped" in server.log.read_text()
    finally:
        stop_group(server.proc)
