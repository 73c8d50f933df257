"""The served champion under closed-loop load (REST and gRPC) against the same model's in-process throughput.

    lmforge bench serve_load                     # = python bench/serve_load.py [--seconds 30]
    python bench/serve_load.py --quick           # 3 s per level: a smoke run, not a measurement
    python bench/serve_load.py --model /tmp/bundle --batch-max-latency-ms 20 --client httpx

1. In process: `deploy.resolve.open_model` + `deploy.core.classify` over the inputs in batches of 1, 32 and 256
   (the servers idle); `inproc_rps` is the best of the three, in texts per second.
2. REST: a real `bentoml serve deploy.service:LMForge` on a free loopback port (adaptive batching on),
   closed-loop clients at concurrency 1, 8 and 32: each sends POST /classify with one text, waits for the
   answer, sends the next. Per level: requests/s, p50/p99 latency, errors (non-200, malformed replies,
   exceptions), the client's own CPU time, the server's CPU time, and the mean server batch size from
   BentoML's /metrics.
3. gRPC: `python -m deploy.grpc_server --workers N` (as many processes as REST's workers: `--workers`) at
   concurrency 32 (lmforge.v1.Inference/Classify, one text per call), the same way; the calls take
   `--grpc-channels` connections in turn (default 4 per worker: the kernel gives each connection to one worker).

Inputs: the test split of params.yaml's `paths.clean_labeled` (what the evaluate stage scores), else a
deterministic set of code snippets. The model: `--model` (a bundle folder or an MLflow model URI), else
LMFORGE_MODEL_URI, else the registry's @champion, resolved the way the service does and passed to both
servers as LMFORGE_MODEL_URI. The load generator runs in this process and competes with the servers for
the same CPUs; its CPU time is reported so that a reader can judge how much of the machine it took.

Both servers start once and stay up; `--runs` rounds (default 3) of 1-3 follow, so that a reader sees how much
the numbers move on a shared machine. Prints the last run's table, the median and min–max over the runs of the
headline numbers, and, as its last line, a JSON object: the last run's `inproc_rps`, `concurrency` {level: rps,
p50_ms, p99_ms, errors, ...}, `grpc` {32: ...}, `ratio_http32_vs_inproc`, `ratio_grpc32_vs_http32`; `runs` (every
run's), `spread` {name: median, min, max, runs}; `target_ratio` (REST ≥ 0.8 of in process), `target_grpc_ratio`
(gRPC ≥ REST), `machine`, `model_version`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack, ExitStack, contextmanager
from pathlib import Path
from typing import Awaitable, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.runtime import serving_env  # noqa: E402  (after the path fix: bench/ runs as a script)
from tasks.ops.servers import stop_group  # noqa: E402

TARGET_RATIO = 0.8
"""The served model at concurrency 32 should reach this fraction of the in-process batched throughput."""
TARGET_GRPC_RATIO = 1.0
"""gRPC at concurrency 32 should serve at least as many texts/s as REST."""
LEVELS = (1, 8, 32)
GRPC_LEVELS = (32,)
INPROC_BATCHES = (1, 32, 256)
BATCH_METRIC = "bentoml_service_adaptive_batch_size"

Call = Callable[[str], Awaitable[str | None]]
"""One request of one text: None when answered correctly, else what went wrong."""


# --- inputs and the model ----------------------------------------------------------------------------


def snippets(n: int = 256) -> list[str]:
    """A deterministic set of short Python snippets (used when there is no test split)."""
    modules = [
        "os",
        "json",
        "asyncio",
        "email",
        "http.client",
        "urllib.request",
        "xml.etree.ElementTree",
        "unittest",
        "tkinter",
        "importlib",
    ]
    bodies = [
        "def {f}(path):\n    import {m}\n    return {m}.__name__ + str(path)",
        (
            "class {F}:\n    def __init__(self, value):\n        self.value = value\n\n"
            "    def {f}(self):\n        return repr(self.value)"
        ),
        (
            "import {m}\n\n\ndef {f}(items):\n    result = []\n"
            "    for item in items:\n        result.append(item * 2)\n    return result"
        ),
        "async def {f}(loop):\n    await loop.sleep(0)\n    return {{'module': '{m}'}}",
        (
            "def test_{f}(self):\n    self.assertEqual({f}(1), 2)\n"
            "    with self.assertRaises(ValueError):\n        {f}(None)"
        ),
    ]
    names = ["read", "parse", "run", "close", "fetch", "send", "load", "render"]
    out = []
    for i in range(n):
        f = f"{names[i % len(names)]}_{i}"
        out.append(bodies[i % len(bodies)].format(f=f, F=f.title().replace("_", ""), m=modules[i % len(modules)]))
    return out


def load_texts(params_file: str, limit: int) -> tuple[list[str], str]:
    """The test split's texts that the service accepts (else `snippets()`), and where they came from."""
    from deploy.requests import LIMITS
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError
    from tasks.shared.io import read_parquet

    try:
        path = load_params(params_file).paths.clean_labeled
        data = read_parquet(path, ["text", "split"])
        texts = [
            t
            for t in data.loc[data["split"] == "test", "text"].tolist()
            if t.strip() and len(t) <= LIMITS.max_text_chars
        ]
        source = f"{path}, test split"
    except UserError as e:
        print(f"no test split ({e}); using generated code snippets", file=sys.stderr)
        texts, source = [], ""
    if not texts:
        texts, source = snippets(), "generated code snippets"
    return (texts[:limit] if limit else texts), source


def inproc(uri: str, texts: list[str], batches: tuple[int, ...], seconds: float) -> tuple[dict, str]:
    """Texts per second of `deploy.core.classify` in batches of each size, and the model version."""
    import torch

    from deploy.core import classify
    from deploy.resolve import open_model

    model = open_model(uri, to_store=False)
    out = {}
    for b in batches:
        chunks = (
            [texts[i : i + b] for i in range(0, len(texts), b)]
            if len(texts) >= b
            else [(texts * (b // len(texts) + 1))[:b]]
        )
        classify(model, chunks[0])  # warm-up
        done, i, t0 = 0, 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds or done == 0:
            classify(model, chunks[i % len(chunks)])
            done, i = done + len(chunks[i % len(chunks)]), i + 1
        out[str(b)] = {
            "rps": round(done / elapsed, 1),
            "texts": done,
            "seconds": round(elapsed, 2),
            "threads": torch.get_num_threads(),
        }
    return out, model.model_version


# --- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextmanager
def server(
    cmd: list[str], env: dict, log: Path, ready: Callable[[], bool], timeout: float
) -> Iterator[subprocess.Popen]:
    """`cmd` in a process group of its own, yielded once `ready()` is true; the group is always stopped."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                raise SystemExit(
                    f"bench/serve_load.py: `{' '.join(cmd)}` exited with {proc.returncode}; log tail:\n{tail(log)}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"bench/serve_load.py: `{' '.join(cmd)}` not ready after {timeout:.0f} s; log tail:\n{tail(log)}"
                )
            time.sleep(0.5)
        yield proc
    finally:
        stop_group(proc)


def group_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) used so far by `proc` and its live descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def batch_metric(base: str) -> tuple[float, float] | None:
    """(sum, count) of BentoML's adaptive batch size histogram from the server's /metrics, None if not there."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
            return parse_batch_metric(r.read().decode())
    except OSError:
        return None


def parse_batch_metric(text: str) -> tuple[float, float] | None:
    """(sum, count) of the adaptive batch size histogram in Prometheus text, over all its series; None if absent."""
    found, sums = False, {"sum": 0.0, "count": 0.0}
    for m in re.finditer(rf"^{BATCH_METRIC}_(sum|count)(?:{{[^}}]*}})? (\S+)$", text, re.M):
        found, sums[m.group(1)] = True, sums[m.group(1)] + float(m.group(2))
    return (sums["sum"], sums["count"]) if found else None


# --- load ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation, as numpy's default), None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(
    latencies_s: list[float],
    errors: list[str],
    wall_s: float,
    client_cpu_s: float,
    server_cpu_s: float | None = None,
    batch: tuple[float, float] | None = None,
) -> dict:
    """One level's numbers: successful requests per second, latency percentiles in ms, errors, CPU shares."""
    p50, p99 = percentile(latencies_s, 50), percentile(latencies_s, 99)
    out = {
        "rps": round(len(latencies_s) / wall_s, 1) if wall_s > 0 else 0.0,
        "p50_ms": None if p50 is None else round(1000 * p50, 2),
        "p99_ms": None if p99 is None else round(1000 * p99, 2),
        "errors": len(errors),
        "requests": len(latencies_s) + len(errors),
        "seconds": round(wall_s, 2),
        "client_cpu_s": round(client_cpu_s, 2),
        "client_cpu_pct": round(100 * client_cpu_s / wall_s, 1) if wall_s > 0 else None,
        "server_cpu_pct": None if server_cpu_s is None or wall_s <= 0 else round(100 * server_cpu_s / wall_s, 1),
        "mean_batch": round(batch[0] / batch[1], 2) if batch and batch[1] > 0 else None,
    }
    if errors:
        out["first_error"] = errors[0][:300]
    return out


async def closed_loop(
    call: Call, texts: list[str], concurrency: int, seconds: float
) -> tuple[list[float], list[str], float]:
    """`concurrency` clients, each sending one text, waiting for the answer, sending the next, until `seconds`
    have passed (requests in flight then are finished and counted). Returns the latencies of the good
    answers, the errors, and the wall time from the first request to the last answer."""
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def client(i: int) -> None:
        k = i
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                problem = await call(texts[k % len(texts)])
            except Exception as e:  # a failed request is a result here, not a crash
                problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
            if problem is None:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(problem)
            k += concurrency

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_level(
    call: Call,
    texts: list[str],
    concurrency: int,
    seconds: float,
    warmup: float,
    proc: subprocess.Popen,
    base: str | None,
) -> dict:
    """Warm up, then one measured closed-loop run, with the client's and the server's CPU time around it."""
    await closed_loop(call, texts, concurrency, warmup)
    before = batch_metric(base) if base else None
    cpu0, srv0 = cpu_seconds(), group_cpu(proc)
    latencies, errors, wall = await closed_loop(call, texts, concurrency, seconds)
    cpu1, srv1 = cpu_seconds(), group_cpu(proc)
    after = batch_metric(base) if base else None
    batch = (after[0] - before[0], after[1] - before[1]) if before and after else None
    return summarize(latencies, errors, wall, cpu1 - cpu0, srv1 - srv0, batch)


def check_reply(body: bytes, status: int) -> str | None:
    if status != 200:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    out = json.loads(body)
    if not (isinstance(out, list) and len(out) == 1 and isinstance(out[0], dict) and "label" in out[0]):
        return f"malformed reply: {body[:200].decode(errors='replace')}"
    return None


async def http_levels(
    base: str,
    texts: list[str],
    levels: tuple[int, ...],
    seconds: float,
    warmup: float,
    proc: subprocess.Popen,
    client: str,
) -> dict:
    """Every concurrency level against POST /classify, with a connection pool of at least the level."""
    url, out = f"{base}/classify", {}
    for c in levels:
        if client == "aiohttp":
            import aiohttp

            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=c), timeout=aiohttp.ClientTimeout(total=120)
            ) as session:

                async def call(text: str) -> str | None:
                    async with session.post(url, json={"texts": [text]}) as r:
                        return check_reply(await r.read(), r.status)

                out[str(c)] = await run_level(call, texts, c, seconds, warmup, proc, base)
        else:
            import httpx

            limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
            async with httpx.AsyncClient(limits=limits, timeout=120) as session:

                async def call(text: str) -> str | None:
                    r = await session.post(url, json={"texts": [text]})
                    return check_reply(r.content, r.status_code)

                out[str(c)] = await run_level(call, texts, c, seconds, warmup, proc, base)
        print(f"  http c={c}: {out[str(c)]['rps']} req/s", file=sys.stderr)
    return out


def grpc_modules():
    """(grpc, lmforge_pb2, lmforge_pb2_grpc), or a string saying what is missing."""
    try:
        import grpc

        from deploy import lmforge_pb2, lmforge_pb2_grpc
    except (ImportError, RuntimeError) as e:  # RuntimeError: the stubs refuse an older grpcio
        return " ".join(str(e).split())
    if not (ROOT / "deploy" / "grpc_server.py").exists():
        return "deploy/grpc_server.py does not exist"
    return grpc, lmforge_pb2, lmforge_pb2_grpc


def grpc_ready(target: str) -> bool:
    """The standard health service answers SERVING (or, without grpcio-health-checking, a Classify succeeds)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except ImportError:
            from deploy import lmforge_pb2, lmforge_pb2_grpc

            try:
                lmforge_pb2_grpc.InferenceStub(channel).Classify(
                    lmforge_pb2.ClassifyRequest(texts=["import os"]), timeout=5
                )
                return True
            except grpc.RpcError:
                return False
        except grpc.RpcError:
            return False


async def grpc_levels(target: str, texts: list[str], args: argparse.Namespace, proc: subprocess.Popen) -> dict:
    """Every concurrency level against lmforge.v1.Inference/Classify, the calls taking args.grpc_channels
    grpc.aio channels in turn: each its own TCP connection (a local subchannel pool: channels to one target share
    a connection otherwise), because the kernel hands each connection to one of the server's worker processes."""
    import grpc

    from deploy import lmforge_pb2, lmforge_pb2_grpc

    out = {}
    async with AsyncExitStack() as stack:
        stubs = [
            lmforge_pb2_grpc.InferenceStub(
                await stack.enter_async_context(
                    grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                )
            )
            for _ in range(args.grpc_channels)
        ]
        turn = itertools.cycle(stubs)

        async def call(text: str) -> str | None:
            try:
                reply = await next(turn).Classify(lmforge_pb2.ClassifyRequest(texts=[text]), timeout=120)
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"
            return None if len(reply.results) == 1 else f"malformed reply: {len(reply.results)} results"

        for c in args.grpc_levels:
            out[str(c)] = await run_level(call, texts, c, args.seconds, args.warmup, proc, None)
            out[str(c)]["channels"] = args.grpc_channels
            print(f"  grpc c={c}: {out[str(c)]['rps']} req/s", file=sys.stderr)
    return out


# --- report --------------------------------------------------------------------------------------


def table(result: dict) -> str:
    """The human-readable table of a result (the JSON line's content)."""

    def cell(v, width: int) -> str:
        return f"{'-' if v is None else v:>{width}}"

    cols = [
        ("rps", 9),
        ("p50_ms", 9),
        ("p99_ms", 9),
        ("errors", 7),
        ("requests", 9),
        ("client_cpu_pct", 15),
        ("server_cpu_pct", 15),
        ("mean_batch", 11),
    ]
    lines = [f"{'what':<16}" + "".join(f"{c:>{w}}" for c, w in cols)]
    for b, m in result.get("inproc", {}).items():
        lines.append(
            f"{'in-process b=' + b:<16}"
            + cell(m["rps"], 9)
            + cell(None, 9) * 2
            + cell(0, 7)
            + cell(m["texts"], 9)
            + cell(None, 15) * 3
            + cell(int(b), 11)
        )
    for proto, key in (("http", "concurrency"), ("grpc", "grpc")):
        levels = result.get(key) or {}
        if "skipped" in levels:
            lines.append(f"{proto + ' (skipped)':<16} {levels['skipped']}")
            continue
        for c, m in levels.items():
            lines.append(f"{proto + ' c=' + c:<16}" + "".join(cell(m.get(col), w) for col, w in cols))
    ratio = result.get("ratio_http32_vs_inproc")
    verdict = "" if ratio is None else f"  ({'met' if ratio >= result['target_ratio'] else 'MISSED'})"
    lines.append(
        f"\nhttp c=32 / in-process: {ratio if ratio is not None else '-'} (target >= {result['target_ratio']}){verdict}"
    )
    g = result.get("ratio_grpc32_vs_http32")
    if g is not None:
        lines.append(
            f"grpc c=32 / http c=32: {g} (target >= {TARGET_GRPC_RATIO})"
            f"  ({'met' if g >= TARGET_GRPC_RATIO else 'MISSED'})"
        )
    for level, m in {
        **result.get("concurrency", {}),
        **{f"grpc {k}": v for k, v in (result.get("grpc") or {}).items() if k != "skipped"},
    }.items():
        if isinstance(m, dict) and m.get("first_error"):
            lines.append(f"first error at {level}: {m['first_error']}")
    return "\n".join(lines)


def ratio(result: dict) -> float | None:
    http32, base = (result.get("concurrency") or {}).get("32"), result.get("inproc_rps")
    return round(http32["rps"] / base, 3) if http32 and base else None


def grpc_ratio(result: dict) -> float | None:
    """gRPC texts/s at concurrency 32 over REST's (None without both)."""
    grpc32, http32 = (result.get("grpc") or {}).get("32"), (result.get("concurrency") or {}).get("32")
    return round(grpc32["rps"] / http32["rps"], 3) if grpc32 and http32 and http32["rps"] else None


# --- main ----------------------------------------------------------------------------------------


def parse_levels(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default=None,
        help="bundle folder or MLflow model URI (default: LMFORGE_MODEL_URI, else the registry's @champion)",
    )
    ap.add_argument(
        "--seconds", type=float, default=30, help="measured seconds per level and per in-process batch size"
    )
    ap.add_argument("--runs", type=int, default=3, help="whole rounds (in process, REST, gRPC); medians are reported")
    ap.add_argument("--quick", action="store_true", help="3 s per level, 1 s warm-up, one run: a smoke run")
    ap.add_argument("--warmup", type=float, default=3, help="unmeasured seconds of the same load before each level")
    ap.add_argument("--levels", type=parse_levels, default=LEVELS, help="REST concurrency levels, comma-separated")
    ap.add_argument(
        "--grpc-levels", type=parse_levels, default=GRPC_LEVELS, help="gRPC concurrency levels ('' for none)"
    )
    ap.add_argument("--inproc-batches", type=parse_levels, default=INPROC_BATCHES, help="in-process batch sizes")
    ap.add_argument(
        "--batch-max-latency-ms",
        type=int,
        default=None,
        help="LMFORGE_BATCH_MAX_LATENCY_MS for the servers (default: theirs)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes of each server: LMFORGE_WORKERS of bentoml serve, gRPC's --workers (default: one per CPU)",
    )
    ap.add_argument(
        "--grpc-channels",
        type=int,
        default=None,
        help="gRPC connections the calls take in turn (default: 4 per server worker; REST's clients hold one each)",
    )
    ap.add_argument(
        "--client", choices=["aiohttp", "httpx"], default="aiohttp", help="HTTP client library of the load generator"
    )
    ap.add_argument("--texts", type=int, default=0, help="use only the first N inputs (0: all)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--ready-timeout", type=float, default=180, help="seconds a server may take to become ready")
    args = ap.parse_args()
    args.grpc_channels = args.grpc_channels or 4 * args.workers
    if args.quick:
        args.seconds, args.warmup, args.runs = 3, 1, 1
    if args.model and Path(args.model).is_dir():
        args.model = str(Path(args.model).resolve())
    return args


def first_classify(base: str, text: str, log: Path) -> str:
    """The model version the REST server answers with (it must answer one text)."""
    import urllib.request

    req = urllib.request.Request(
        f"{base}/classify", data=json.dumps({"texts": [text]}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())[0]["model_version"]
    except OSError as e:
        sys.exit(f"bench/serve_load.py: the first POST /classify failed ({e}); log tail:\n{tail(log)}")


def alive(proc: subprocess.Popen, what: str, log: Path) -> None:
    if proc.poll() is not None:
        sys.exit(f"bench/serve_load.py: the {what} server died during the run; log tail:\n{tail(log)}")


@contextmanager
def servers(args: argparse.Namespace, env: dict, tmp: Path, texts: list[str]) -> Iterator[dict]:
    """Both servers started once and kept up for every run: {"http": (proc, base, log), "grpc": (...) or reason}."""
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        port = free_port()
        base, log = f"http://127.0.0.1:{port}", tmp / "bentoml.log"
        cmd = [str(bin_dir / "bentoml"), "serve", "deploy.service:LMForge", "--host", "127.0.0.1", "--port", str(port)]
        print(f"starting {' '.join(cmd[1:])} ...", file=sys.stderr)
        proc = stack.enter_context(server(cmd, env, log, lambda: http_ok(f"{base}/readyz"), args.ready_timeout))
        out: dict = {"http": (proc, base, log), "version": first_classify(base, texts[0], log)}
        mods = grpc_modules() if args.grpc_levels else "no --grpc-levels"
        if isinstance(mods, str):
            out["grpc"] = mods
        else:
            target, glog = f"127.0.0.1:{free_port()}", tmp / "grpc.log"
            cmd = [sys.executable, "-m", "deploy.grpc_server", "--host", "127.0.0.1", "--port", target.split(":")[1]]
            cmd += ["--workers", str(args.workers)]
            print(f"starting {' '.join(cmd[1:])} ...", file=sys.stderr)
            gproc = stack.enter_context(server(cmd, env, glog, lambda: grpc_ready(target), args.ready_timeout))
            out["grpc"] = (gproc, target, glog)
        yield out


def one_run(args: argparse.Namespace, uri: str, texts: list[str], up: dict) -> dict:
    """One round: in process (the servers idle), REST levels, gRPC levels; the per-run result."""
    inproc_results, version = inproc(uri, texts, args.inproc_batches, args.seconds)
    result: dict = {"inproc": inproc_results, "inproc_rps": max(m["rps"] for m in inproc_results.values())}
    proc, base, log = up["http"]
    result["concurrency"] = asyncio.run(
        http_levels(base, texts, args.levels, args.seconds, args.warmup, proc, args.client)
    )
    alive(proc, "BentoML", log)
    if isinstance(up["grpc"], str):
        result["grpc"] = {"skipped": up["grpc"]}
    else:
        gproc, target, glog = up["grpc"]
        result["grpc"] = asyncio.run(grpc_levels(target, texts, args, gproc))
        alive(gproc, "gRPC", glog)
    result["ratio_http32_vs_inproc"] = ratio(result)
    result["ratio_grpc32_vs_http32"] = grpc_ratio(result)
    result["model_version"] = version
    return result


def spread(runs: list[dict]) -> dict:
    """Median and min–max over the runs of the headline numbers (None where a run lacks one)."""
    import statistics

    picks = {
        "inproc_rps": lambda r: r.get("inproc_rps"),
        "http32_rps": lambda r: ((r.get("concurrency") or {}).get("32") or {}).get("rps"),
        "grpc32_rps": lambda r: ((r.get("grpc") or {}).get("32") or {}).get("rps"),
        "ratio_http32_vs_inproc": lambda r: r.get("ratio_http32_vs_inproc"),
        "ratio_grpc32_vs_http32": lambda r: r.get("ratio_grpc32_vs_http32"),
        "errors": lambda r: sum(
            m.get("errors", 0)
            for k in ("concurrency", "grpc")
            for m in (r.get(k) or {}).values()
            if isinstance(m, dict)
        ),
    }
    out = {}
    for name, pick in picks.items():
        values = [v for v in map(pick, runs) if v is not None]
        out[name] = (
            {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values), "runs": values}
            if values
            else None
        )
    return out


def spread_table(summary: dict) -> str:
    """One line per headline number: median [min–max] over the runs."""
    lines = [f"{'over the runs':<24}{'median':>10}   min–max"]
    for name, s in summary.items():
        if s is not None:
            lines.append(f"{name:<24}{s['median']:>10}   {s['min']}–{s['max']}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    os.chdir(ROOT)  # the servers run here; params.yaml's relative paths resolve the same way in this process
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a registry download draws bars on stderr
    # the servers' process settings (`lmforge serve` sets them) here too, before torch loads: the in-process figure
    # is measured as the servers run
    os.environ.update(serving_env(os.environ))

    import torch

    from deploy.resolve import MODEL_URI_ENV, ModelUnavailable, default_model_uri

    load1 = os.getloadavg()[0]
    try:
        uri = args.model or default_model_uri()
        texts, source = load_texts(args.params, args.texts)
        open_model_check(uri)
    except ModelUnavailable as e:
        sys.exit(f"bench/serve_load.py: {e}")
    print(f"model {uri}; {len(texts)} inputs from {source}; {args.runs} run(s)", file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEY"}  # the benchmark measures serving, not auth
    env.update({MODEL_URI_ENV: uri, "BENTOML_DO_NOT_TRACK": "true", "LMFORGE_WORKERS": str(args.workers)})
    if args.batch_max_latency_ms is not None:
        env["LMFORGE_BATCH_MAX_LATENCY_MS"] = str(args.batch_max_latency_ms)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        env.setdefault("BENTOML_HOME", str(Path(tmp) / "bentoml"))
        with servers(args, env, Path(tmp), texts) as up:
            for i in range(args.runs):
                print(f"run {i + 1}/{args.runs}: in process, batches {args.inproc_batches} ...", file=sys.stderr)
                runs.append(one_run(args, uri, texts, up))
    result = {**runs[-1], "runs": runs, "spread": spread(runs)}
    if up["version"] != result["model_version"]:
        print(f"warning: the server answered as {up['version']}, the in-process model is {result['model_version']}")
    client_lib = __import__(args.client)
    result.update(
        {
            "target_ratio": TARGET_RATIO,
            "target_grpc_ratio": TARGET_GRPC_RATIO,
            "machine": (
                f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                f"({torch.get_num_threads()} threads in process), load {load1:.2f} at start, "
                f"{os.getloadavg()[0]:.2f} at the end"
            ),
            "model": uri,
            "inputs": f"{len(texts)} texts from {source}",
            "seconds_per_level": args.seconds,
            "client": f"{args.client} {client_lib.__version__}, closed loop, one text per request",
            "batch_max_latency_ms": args.batch_max_latency_ms,
            "workers": args.workers,
        }
    )
    print(
        f"{result['inputs']}; model {uri} ({result['model_version']}); {result['machine']}; "
        f"{args.seconds:g} s per level, {args.warmup:g} s warm-up, {args.runs} run(s) (the table: the last)"
    )
    print(table(result))
    print(spread_table(result["spread"]))
    print(json.dumps(result))


def open_model_check(uri: str) -> None:
    """Fail early, in one line, when the model cannot be loaded (before any server starts)."""
    from deploy.resolve import open_model

    open_model(uri, to_store=False)


if __name__ == "__main__":
    main()
