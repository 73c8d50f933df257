"""Prometheus metrics of the gRPC server (the REST service has BentoML's own at /metrics).

`python -m deploy.grpc_server --metrics-port 9464` (0 = off, the default) serves them over HTTP at
`http://<host>:9464/metrics`:

- `lmforge_grpc_requests_total{method, code}`: finished Inference calls by method and status code (`OK`,
  `INVALID_ARGUMENT`, ...); calls refused for a missing API key never reach the servicer and are not counted;
- `lmforge_grpc_errors_total{method, code}`: the calls among them that did not end `OK`;
- `lmforge_grpc_request_seconds{method}`: time in the servicer per call (a GenerateStream: until its stream is
  handed to grpcio, i.e. the checks; its tokens are not timed);
- `lmforge_grpc_batch_texts{method}`: texts per forward pass of a batched method (Classify, Search, Embed): above 1
  while concurrent calls are merged (deploy/batching.py).

Each server has its own registry (several servers in one process do not collide; nothing global is touched).
With `--workers N` > 1 every worker process records into files under a temporary PROMETHEUS_MULTIPROC_DIR (set by
the parent before it starts them: prometheus_client's multiprocess mode) and the parent serves their sums
(`serve_multiprocess`): one scrape covers every worker, counters and histograms added up over the processes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class GrpcMetrics:
    """The counters and histograms of one gRPC server, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmforge_grpc_requests", "Finished Inference calls", ["method", "code"], registry=self.registry
        )
        self.errors = Counter(
            "lmforge_grpc_errors", "Inference calls that did not end OK", ["method", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "lmforge_grpc_request_seconds",
            "Seconds in the servicer per call",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "lmforge_grpc_batch_texts",
            "Texts per forward pass of a batched method",
            ["method"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        """Count one finished call and its time."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_batch(self, method: str, texts: int) -> None:
        """Record the size of one forward pass."""
        self.batch.labels(method).observe(texts)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve `/metrics` over HTTP on `host:port` from a daemon thread; returns the HTTP server (`.shutdown()`
        stops it; `.server_port` is the port, useful with port 0)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server


def serve_multiprocess(directory: str, port: int, host: str = "127.0.0.1"):
    """Serve `/metrics` summed over the worker processes that record under `directory` (their
    PROMETHEUS_MULTIPROC_DIR); returns the HTTP server, as `GrpcMetrics.serve` does."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server
