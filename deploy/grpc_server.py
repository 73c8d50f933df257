"""gRPC front end: the REST service's model, limits and answers over gRPC (BentoML's SDK serves no gRPC).

Start it with `make serve-grpc` (`lmforge serve --grpc`, i.e. `python -m deploy.grpc_server`); it serves
the model deploy/resolve.py finds (LMFORGE_MODEL_URI, a Bento's model, else the registry's @champion) on
127.0.0.1:50051. The contract is deploy/lmforge.proto (`lmforge.v1.Inference`: Classify, Generate,
GenerateStream, Metadata, the knowledge-graph task's Extract and GraphQuery when an extractor is found, and the
alignment task's Search and Embed when an encoder is found: deploy/resolve.py's open_search);
`make grpc-stubs` regenerates deploy/lmforge_pb2*.py from it.

Concurrent Classify calls are batched into one forward pass, like REST's adaptive batching (deploy/batching.py;
`--max-workers`, default 32, calls are served at once, so a batch holds at most that many calls). With
`--metrics-port PORT` (0 = off, the default) Prometheus metrics are served at http://HOST:PORT/metrics: calls,
errors and latency by method and status code, texts per batched forward pass (deploy/metrics.py).

`--workers N` (default: LMFORGE_WORKERS, else 1, as for REST's BentoML workers) runs N server processes on the
one port, as grpcio's multiprocessing example does: the parent reserves the port, spawns the workers (no gRPC
state is inherited), and each binds its own server with SO_REUSEPORT, so the kernel spreads connections over
them (a connection, and every call on it, stays with one worker: N workers need at least N client connections).
Each worker loads the model and gives torch 1/N of the cores. The parent serves the metrics summed over the
workers, stops every worker on SIGTERM/SIGINT (SIGKILL after --grace + 10 s), and stops them all and exits 1 if
one ends by itself; a worker whose parent vanished (SIGKILL) stops too. Linux only for N > 1 (SO_REUSEPORT's
load spreading); another process of the same user that also sets SO_REUSEPORT could share the port unnoticed.

Besides Inference the server carries the standard health service (`grpc.health.v1.Health`: SERVING for
"" and "lmforge.v1.Inference" while a model is loaded) and server reflection, so `grpcurl` needs no .proto.

Errors are status codes with a one-line message, never INTERNAL for a client's mistake: a request outside
the limits is INVALID_ARGUMENT (deploy/requests.py's check_texts and GenerationRequest decide, as for REST's
400s); Generate on a masked-LM model is FAILED_PRECONDITION; with no loadable model the server stays up,
health says NOT_SERVING and every Inference call is UNAVAILABLE with the reason (no crash loop); with
LMFORGE_API_KEY set, Inference calls without `authorization: Bearer <key>` or `x-api-key: <key>`
metadata are UNAUTHENTICATED (health and reflection stay open, like REST's probes).
"""

from __future__ import annotations

import argparse
import functools
import hmac
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent import futures
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import grpc
from google.protobuf import json_format, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from deploy import lmforge_pb2 as pb
from deploy import lmforge_pb2_grpc as pb_grpc
from deploy.batching import Batcher
from deploy.core import (
    AlignUnavailable,
    CannotGenerate,
    KgUnavailable,
    align_batchers,
    check_can_generate,
    classify,
    describe,
    extract,
    generate,
    graph_query,
    stream,
)
from deploy.metrics import GrpcMetrics, serve_multiprocess
from deploy.requests import (
    API_KEY_ENV,
    LIMITS,
    MAX_BODY_BYTES,
    GenerationRequest,
    InvalidInput,
    check_embed,
    check_search,
    check_sparql,
    check_texts,
)
from deploy.resolve import ModelUnavailable, ServedKG, ServedModel, ServedSearch, open_kg, open_model, open_search
from deploy.runtime import WORKERS_ENV
from deploy.sparql import GraphQueries, QueryRefused, QueryTimeout

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name
"""`lmforge.v1.Inference`: the name health checks and reflection know the service by."""
DEFAULT_PORT = 50051
MAX_MESSAGE_BYTES = MAX_BODY_BYTES
UNAUTHENTICATED = (
    "missing or wrong API key: send metadata `authorization: Bearer <key>` or `x-api-key: <key>` "
    f"({API_KEY_ENV} is set on the server)"
)
OPEN_METHODS = (f"/{health.SERVICE_NAME}/", "/grpc.reflection.")
"""Method prefixes served without the API key: health checks and reflection (any version a client tries)."""

logger = logging.getLogger("lmforge.grpc")


def _rpc(method: Callable) -> Callable:
    """Turn the core's exceptions into status codes with their one-line message; anything else is a bug:
    its traceback goes to the log and the client gets INTERNAL with one line. Every call is counted and timed in
    the servicer's metrics (deploy/metrics.py)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        start = time.perf_counter()
        try:
            out = method(self, request, context)
            self.metrics.observe_call(method.__name__, "OK", time.perf_counter() - start)
            return out
        except (InvalidInput, QueryRefused) as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except QueryTimeout as e:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(e)
        except (KgUnavailable, AlignUnavailable) as e:
            code, message = grpc.StatusCode.UNAVAILABLE, str(e)
        except CannotGenerate as e:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(e)
        except ModelUnavailable as e:
            code, message = grpc.StatusCode.UNAVAILABLE, f"model unavailable: {e}"
        except Exception as e:
            logger.exception("lmforge: %s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {' '.join(str(e).split())}"
        self.metrics.observe_call(method.__name__, code.name, time.perf_counter() - start)
        context.abort(code, message)  # raises; outside the `try` so that it is not caught above

    return wrapper


def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    """The core's request from a GenerateRequest: unset optional fields keep the core's defaults.

    Raises:
        InvalidInput: a field is outside the limits (the message names it).
    """
    given = {
        name: getattr(request, name)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
        if request.HasField(name)
    }
    return GenerationRequest(prompt=request.prompt, stop=tuple(request.stop), **given)


class InferenceServicer(pb_grpc.InferenceServicer):
    """`lmforge.v1.Inference` over one loaded model (or none, with the reason); every method is safe to call
    from the server's thread pool at once (inference only reads the model).

    Concurrent Classify calls are merged into one forward pass, as REST's adaptive batching merges /classify
    requests: one thread classifies; the calls that arrived meanwhile (up to Limits.max_items texts) run next as
    one batch (deploy/batching.py); a lone call never waits for company.
    """

    def __init__(
        self,
        model: ServedModel | None,
        unavailable: str | None = None,
        kg: ServedKG | None = None,
        graph: GraphQueries | None = None,
        align: ServedSearch | None = None,
        metrics: GrpcMetrics | None = None,
    ) -> None:
        self.model, self.kg, self.graph = model, kg, graph
        self.metrics = GrpcMetrics() if metrics is None else metrics
        self.classifications = Batcher(self._classify_batch, LIMITS.max_items, "lmforge-classify")
        self.unavailable = None if model is not None else unavailable or "no model loaded"
        self.align = align
        self.searches, self.embeddings = align_batchers(align, LIMITS.max_embed_items)

    def _model(self) -> ServedModel:
        if self.model is None:
            raise ModelUnavailable(self.unavailable)
        return self.model

    def _generating(self, request: pb.GenerateRequest) -> tuple[ServedModel, GenerationRequest]:
        model = self._model()
        check_can_generate(model)
        return model, generation_request(request)

    def _classify_batch(self, _key, texts: list[str]) -> list[dict]:
        """One forward pass over the texts of the Classify calls merged by the batcher."""
        self.metrics.observe_batch("Classify", len(texts))
        return classify(self._model(), texts)

    @_rpc
    def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        self._model()  # UNAVAILABLE at once, before the texts are checked or queued
        results = self.classifications.submit(None, check_texts(list(request.texts))).result()
        return pb.ClassifyResponse(results=[pb.Classification(**r) for r in results])

    @_rpc
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        model, req = self._generating(request)
        out = generate(model, req)
        return pb.GenerateResponse(
            text=out.text, finish_reason=out.finish_reason, tokens=out.tokens, model_version=model.model_version
        )

    @_rpc
    def GenerateStream(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateChunk]:
        model, req = self._generating(
            request
        )  # checked before the first message, so a bad request gets its status at once
        return self._chunks(model, req, context)

    def _chunks(self, model: ServedModel, req: GenerationRequest, context) -> Iterator[pb.GenerateChunk]:
        """The pieces of `stream`, then the summary; stops sampling when the call is cancelled or past its deadline."""
        pieces = stream(model, req)
        while context.is_active():
            try:
                piece = next(pieces)
            except StopIteration as done:
                out = done.value
                yield pb.GenerateChunk(
                    finish_reason=out.finish_reason, tokens=out.tokens, model_version=model.model_version
                )
                return
            except (
                Exception
            ) as e:  # after the first message `_rpc` no longer applies: the same one line, the traceback in the log
                logger.exception("lmforge: GenerateStream failed")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {' '.join(str(e).split())}")
            yield pb.GenerateChunk(text=piece)

    @_rpc
    def Metadata(self, request: pb.MetadataRequest, context) -> pb.MetadataResponse:
        model = self._model()
        meta = model.metadata()
        document = struct_pb2.Struct()
        json_format.ParseDict(meta, document)
        return pb.MetadataResponse(
            registered_model=meta["registered_model"],
            version=meta["version"],
            model_version=meta["model_version"],
            variant=meta["variant"],
            labels=meta["labels"],
            can_generate=meta["can_generate"],
            metadata=document,
        )

    @_rpc
    def Extract(self, request: pb.ExtractRequest, context) -> pb.ExtractResponse:
        texts = check_texts(list(request.texts), max_items=LIMITS.max_extract_items, max_chars=LIMITS.max_extract_chars)
        results = [
            pb.Extraction(
                entities=[pb.Entity(**e) for e in r["entities"]],
                relations=[pb.Relation(**x) for x in r["relations"]],
                model_version=r["model_version"],
            )
            for r in extract(self.kg, texts)
        ]
        return pb.ExtractResponse(results=results)

    @_rpc
    def GraphQuery(self, request: pb.GraphQueryRequest, context) -> pb.GraphQueryResponse:
        document = struct_pb2.Struct()
        json_format.ParseDict(graph_query(self.graph, check_sparql(request.sparql)), document)
        return pb.GraphQueryResponse(result=document)

    @_rpc
    def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        query, k, mode = check_search(request.query, request.k if request.HasField("k") else 10, request.mode or None)
        (out,) = self.searches.submit((k, mode), [query]).result()
        hits = [pb.SearchHit(**hit) for hit in out["results"]]
        return pb.SearchResponse(results=hits, mode=out["mode"], model_version=out["model_version"])

    @_rpc
    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        texts, kind = check_embed(list(request.texts), request.kind)
        vectors = self.embeddings.submit(kind, texts).result()
        return pb.EmbedResponse(
            vectors=[pb.Vector(values=v) for v in vectors], dim=len(vectors[0]), model_version=self.align.model_version
        )


def open_graph(kg: ServedKG | None) -> GraphQueries | None:
    """Query workers over the extractor's graph (None without one), with the REST service's limits."""
    if kg is None or kg.graph is None:
        return None
    return GraphQueries(kg.graph, timeout=LIMITS.sparql_timeout_s, max_rows=LIMITS.sparql_rows)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Refuse Inference calls without the key (`authorization: Bearer <key>` or `x-api-key: <key>`) with
    UNAUTHENTICATED; health checks and reflection pass (OPEN_METHODS)."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_METHODS):
            return True
        md = {k.lower(): v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        given = md.get("x-api-key") or md.get("authorization", "").removeprefix("Bearer ").strip()
        return bool(given) and hmac.compare_digest(given.encode(), self.key)

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or self._allowed(details):
            return handler

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED)

        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return kind(
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def build_server(
    model: ServedModel | None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_workers: int = 32,
    *,
    unavailable: str | None = None,
    api_key: str | None = None,
    checks: health.HealthServicer | None = None,
    kg: ServedKG | None = None,
    graph: GraphQueries | None = None,
    align: ServedSearch | None = None,
    metrics: GrpcMetrics | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.Server, int]:
    """An unstarted server for `model` (None: every Inference call answers UNAVAILABLE with `unavailable`),
    with health checks and reflection, listening on `host:port` (port 0: any free port).

    `max_workers` calls run at once (a stream holds its worker until it ends; a Classify call waits in its worker
    for its batch, so batches reach at most `max_workers` calls); with 8 times as many in flight, the next call is
    refused at once with RESOURCE_EXHAUSTED instead of queueing without bound.
    `api_key` defaults to LMFORGE_API_KEY; `checks` is the health servicer to register (pass one in to
    call its `enter_graceful_shutdown()` before stopping; default: a new one); `kg` and `graph` serve Extract and
    GraphQuery, `align` Search and Embed (None: UNAVAILABLE); `metrics` records the calls (default: a new
    GrpcMetrics; serve it with its `serve(port)`); `reuse_port` lets several processes bind the same port
    (SO_REUSEPORT: `--workers`); without it a port in use is an error, as it should be for one process.

    Returns:
        The server and the port it is bound to.

    Raises:
        OSError: nothing can listen on `host:port` (taken, or no such address).
    """
    api_key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lmforge-grpc"),
        interceptors=[ApiKeyInterceptor(api_key)] if api_key else None,
        options=options,
        maximum_concurrent_rpcs=8 * max_workers,
    )
    servicer = InferenceServicer(model, unavailable, kg, graph, align, metrics)
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    checks = health.HealthServicer() if checks is None else checks
    status = health_pb2.HealthCheckResponse.SERVING if model is not None else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        checks.set(name, status)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    where = address(host, port)
    try:
        bound = server.add_insecure_port(where)
    except RuntimeError:  # grpcio's "Failed to bind to address"
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {where}: the port is taken or the address is not this machine's")
    return server, bound


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m deploy.grpc_server`."""
    parser = argparse.ArgumentParser(prog="python -m deploy.grpc_server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 or :: for every interface)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: any free port, printed at start-up)")
    parser.add_argument("--max-workers", type=int, default=32, help="calls served at once (per worker process)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"server processes sharing the port (default: {WORKERS_ENV}, else 1, as for REST's BentoML workers)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="serve Prometheus metrics at http://HOST:PORT/metrics (deploy/metrics.py; 0: off)",
    )
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds calls in flight may take to finish on shutdown"
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        raw = os.environ.get(WORKERS_ENV, "").strip()
        if raw and not raw.isdigit():
            parser.error(f"{WORKERS_ENV}={raw!r} is not an integer")
        args.workers = int(raw) if raw else 1
    if args.workers < 1:
        parser.error(f"--workers (or {WORKERS_ENV}) must be at least 1, not {args.workers}")
    return args


def open_served() -> tuple[ServedModel | None, str | None, ServedKG | None, ServedSearch | None]:
    """The model (or None and why it is unavailable), the extractor and the encoder, as resolve.py finds them."""
    model, unavailable = None, None
    try:
        model = open_model()
    except ModelUnavailable as e:  # stay up and say why on every call, instead of crash-looping
        unavailable = str(e)
    except Exception as e:  # a bug: its traceback once, then the same UNAVAILABLE answers (a restart would fail again)
        logger.exception("lmforge: loading the model failed")
        unavailable = f"{type(e).__name__}: {' '.join(str(e).split())}"
    kg = None
    try:
        kg = open_kg()
    except ModelUnavailable as e:  # classification is served anyway; Extract and GraphQuery say why
        logger.error("lmforge: no extractor to serve: %s", e)
    align = None
    try:
        align = open_search()
    except ModelUnavailable as e:  # the other tasks are served anyway; Search and Embed say why
        logger.error("lmforge: no encoder to serve: %s", e)
    return model, unavailable, kg, align


def say(line: str) -> None:
    """One line of the start-up/shutdown story on stderr."""
    print(f"lmforge: {line}", file=sys.stderr, flush=True)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(args: argparse.Namespace, worker: str = "", parent: int | None = None) -> None:
    """Load the model, serve on args.host:args.port until SIGTERM or SIGINT (or, in a worker, until its `parent`
    process is gone), then finish the calls in flight (up to args.grace seconds).

    `worker` ("1/2 ", ...) names a worker process in its lines; workers share the port (SO_REUSEPORT) and leave
    the metrics exporter to their parent.
    """
    model, unavailable, kg, align = open_served()
    checks, metrics = health.HealthServicer(), GrpcMetrics()
    try:
        server, port = build_server(
            model,
            args.host,
            args.port,
            args.max_workers,
            unavailable=unavailable,
            checks=checks,
            kg=kg,
            graph=open_graph(kg),
            align=align,
            metrics=metrics,
            reuse_port=parent is not None,
        )
        exporter = metrics.serve(args.metrics_port, args.host) if args.metrics_port and parent is None else None
    except OSError as e:
        sys.exit(f"lmforge: error: {e}")
    stop = stop_on_signals()
    server.start()
    where = f"{worker}on {address(args.host, port)}"
    if model is not None:
        say(f"gRPC {where}: serving {describe(model)}")
    else:
        say(f"gRPC {where}: no model to serve, answering UNAVAILABLE: {unavailable}")
    if exporter is not None:
        say(f"metrics on http://{address(args.host, exporter.server_port)}/metrics")
    # a worker whose parent was killed outright (SIGKILL: no chance to stop it) ends itself instead of lingering
    while not stop.wait(1.0):
        if parent is not None and os.getppid() != parent:
            break
    checks.enter_graceful_shutdown()  # health checks say NOT_SERVING while calls in flight finish
    server.stop(args.grace).wait()
    say(f"gRPC {where}: stopped")


def _worker(args: argparse.Namespace, number: int, parent: int) -> None:
    """A worker process: one share of the cores for torch's threads, then `serve` (spawned: no gRPC state is
    inherited, as grpcio requires of processes started after it was used)."""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # oversubscribed OpenMP threads spin against each other (deploy/service.py does the same for REST's workers)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    serve(args, f"worker {number}/{args.workers} (pid {os.getpid()}) ", parent)


@contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """A socket bound (not listening) to host:port with SO_REUSEPORT for the workers' lifetime: it resolves port 0
    to one port for every worker and fails at once, naming the address, when something else holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as e:
            raise OSError(f"cannot listen on {address(host, port)}: {e.strerror or e}") from None
        yield sock.getsockname()[1]


def serve_workers(args: argparse.Namespace) -> int:
    """Run args.workers server processes on one port (grpcio's multiprocessing pattern: each process its own
    server, bound with SO_REUSEPORT; the kernel spreads connections over them) and, with --metrics-port, serve
    their summed metrics; on SIGTERM or SIGINT stop every worker (SIGKILL after args.grace + 10 s). Returns the
    exit status: 0, or 1 when a worker ended by itself (the others are stopped: a supervisor restarts the lot)."""
    stop = stop_on_signals()
    with ExitStack() as stack:
        try:
            args.port = stack.enter_context(reserved_port(args.host, args.port))
        except OSError as e:
            sys.exit(f"lmforge: error: {e}")
        if args.metrics_port:  # set before the workers start: prometheus_client reads it when a worker imports it
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = stack.enter_context(
                tempfile.TemporaryDirectory(prefix="lmforge-grpc-metrics-")
            )
            exporter = serve_multiprocess(os.environ["PROMETHEUS_MULTIPROC_DIR"], args.metrics_port, args.host)
            stack.callback(exporter.shutdown)
        where = address(args.host, args.port)
        spawn = multiprocessing.get_context("spawn")
        procs = [spawn.Process(target=_worker, args=(args, i + 1, os.getpid())) for i in range(args.workers)]
        for p in procs:
            p.start()
        say(f"gRPC on {where}: {args.workers} worker processes (pids {', '.join(str(p.pid) for p in procs)})")
        if args.metrics_port:
            say(f"metrics on http://{address(args.host, exporter.server_port)}/metrics (summed over the workers)")
        while not stop.wait(0.5) and all(p.is_alive() for p in procs):
            pass
        failed = [p for p in procs if not p.is_alive()] if not stop.is_set() else []
        for p in failed:
            say(f"gRPC on {where}: worker pid {p.pid} ended (exit code {p.exitcode}): stopping the others")
        stop_workers(procs, args.grace + 10)
        say(f"gRPC on {where}: stopped")
    return 1 if failed else 0


def stop_workers(procs: list, timeout: float) -> None:
    """SIGTERM every live worker, wait up to `timeout` seconds for all of them, SIGKILL the rest."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            say(f"worker pid {p.pid} did not stop in {timeout:g} s: killed")
            p.kill()
            p.join()


def main(argv: list[str] | None = None) -> None:
    """`python -m deploy.grpc_server [--host H] [--port P] [--workers N]`: serve until SIGTERM or Ctrl-C, then
    finish the calls in flight (up to --grace seconds); with N > 1, N worker processes share the port."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workers == 1:
        serve(args)
    else:
        sys.exit(serve_workers(args))


if __name__ == "__main__":
    main()
