"""The alignment task served over HTTP: POST /search latency (p50, p99) at concurrency 1 and 8.

    python bench/search_http.py                                   # the encoder open_search finds (the champion, ...)
    python bench/search_http.py --encoder data/models/encoder --index data/align/index --seconds 20

A real `bentoml serve deploy.service:LMForge` on a free loopback port (one worker, as `make serve` on 2 cores),
closed-loop clients (bench/serve_load.py's): each sends POST /search {"query", "k"} and waits for the answer before
sending the next; per level: requests/s, p50/p99 latency, errors, the client's and the server's CPU. The server's
/search batches concurrent queries into one forward pass of the text tower (deploy/batching.py); the load generator
runs in this process and competes with the server for the same CPUs.

Queries: the test pairs' `query` column of params.yaml's `paths.align_data` (what the evaluation searches with),
else a fixed list of natural-language queries. The encoder: `--encoder` (a bundle folder, its index `--index`, or a
models:/ URI), else what deploy/resolve.py's open_search finds (LMFORGE_ENCODER_URI, the registry's @champion, the
workspace's paths.align_model + paths.align_index). Prints a table and, as its last line, a JSON object:
`search_http` {level: rps, p50_ms, p99_ms, ...}, `mode`, `model_version`, `target_p50_ms`, `machine`.
`part_http` is the same measurement as bench/search.py's `--parts` function (`PARTS["http"] = part_http`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_load import closed_loop, cpu_seconds, free_port, group_cpu, server, summarize, tail  # noqa: E402

from deploy.resolve import ENCODER_URI_ENV, INDEX_ENV  # noqa: E402

TARGET_P50_MS = 20.0
"""The issue's target: /search p50 at most 20 ms on 2 cores."""
LEVELS = (1, 8)
QUERIES = [
    "Return the message's content type.",
    "Parse a JSON document and return a Python object.",
    "Join two or more path components.",
    "Sleep for the given number of seconds.",
    "Read the configuration file and return its sections.",
    "Create a temporary directory.",
    "Encode a string as base64.",
    "Return the current event loop.",
    "Compress data with zlib.",
    "Split a string into shell-like tokens.",
]


def load_queries(params_file: str = "params.yaml") -> tuple[list[str], str]:
    """The test pairs' queries (else QUERIES), and where they came from."""
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError
    from tasks.shared.io import read_parquet

    try:
        path = Path(load_params(params_file).paths.align_data) / "pairs.parquet"
        pairs = read_parquet(path, ["query", "split"])
        queries = [q for q in pairs.loc[pairs["split"] == "test", "query"].tolist() if q.strip()]
    except (UserError, OSError, KeyError) as e:
        print(f"no test queries ({' '.join(str(e).split())}); using {len(QUERIES)} fixed ones", file=sys.stderr)
        queries = []
    return (queries, f"{path}, test split") if queries else (QUERIES, "fixed queries")


def post(url: str, body: dict, timeout: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}
    except OSError as e:
        return 0, {"error": str(e)}


async def levels_of(base: str, queries: list[str], k: int, spec: dict, proc) -> dict:
    """Every concurrency level against POST /search, one httpx connection per client."""
    import httpx

    out = {}
    for c in spec["levels"]:
        limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
        async with httpx.AsyncClient(limits=limits, timeout=120) as session:

            async def call(query: str) -> str | None:
                r = await session.post(f"{base}/search", json={"query": query, "k": k})
                if r.status_code != 200:
                    return f"HTTP {r.status_code}: {r.text[:200]}"
                return None if len(r.json()["results"]) > 0 else "no results"

            await closed_loop(call, queries, c, spec["warmup"])
            cpu0, srv0 = cpu_seconds(), group_cpu(proc)
            latencies, errors, wall = await closed_loop(call, queries, c, spec["seconds"])
            out[str(c)] = summarize(latencies, errors, wall, cpu_seconds() - cpu0, group_cpu(proc) - srv0)
        print(f"  /search c={c}: p50 {out[str(c)]['p50_ms']} ms, {out[str(c)]['rps']} req/s", file=sys.stderr)
    return out


def search_http(
    encoder: str | None,
    index: str | None,
    queries: list[str],
    levels: tuple[int, ...] = LEVELS,
    seconds: float = 10.0,
    warmup: float = 2.0,
    k: int = 10,
    workers: int = 1,
    ready_timeout: float = 180.0,
) -> dict:
    """/search p50/p99 per concurrency level against a real `bentoml serve` of the encoder (None: what open_search
    finds), with the served mode and model version."""
    env = {k_: v for k_, v in os.environ.items() if k_ != "LMFORGE_API_KEY"}  # measures serving, not auth
    env.update({"BENTOML_DO_NOT_TRACK": "true", "LMFORGE_WORKERS": str(workers), "LMFORGE_EXTRACTOR_URI": "off"})
    if encoder:
        env[ENCODER_URI_ENV] = encoder
    if index:
        env[INDEX_ENV] = index
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        env.setdefault("BENTOML_HOME", str(Path(tmp) / "bentoml"))
        base, log = f"http://127.0.0.1:{free_port()}", Path(tmp) / "bentoml.log"
        cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "deploy.service:LMForge"]
        cmd += ["--host", "127.0.0.1", "--port", base.rsplit(":", 1)[1]]
        print(f"starting {' '.join(cmd[1:])} ...", file=sys.stderr)

        def ready() -> bool:  # /readyz speaks for the classifier; /search for the encoder
            status, _ = post(f"{base}/search", {"query": queries[0], "k": k}, timeout=5)
            if status in (404, 503):
                raise SystemExit(f"bench/search_http.py: /search answers {status}; log tail:\n{tail(log)}")
            return status == 200

        with server(cmd, env, log, ready, ready_timeout) as proc:
            first = post(f"{base}/search", {"query": queries[0], "k": k})[1]
            spec = {"levels": levels, "seconds": seconds, "warmup": warmup}
            result = asyncio.run(levels_of(base, queries, k, spec, proc))
            if proc.poll() is not None:
                raise SystemExit(f"bench/search_http.py: the server died during the run; log tail:\n{tail(log)}")
    return {
        "search_http": result,
        "mode": first["mode"],
        "model_version": first["model_version"],
        "k": k,
        "workers": workers,
    }


def part_http(args, params) -> tuple[list, dict]:
    """bench/search.py's `http` part: (rows, numbers) of `search_http` on the encoder open_search finds."""
    queries, source = load_queries()
    seconds = getattr(args, "http_seconds", 10.0)
    result = search_http(None, None, queries, LEVELS, seconds)
    rows = [
        (
            f"/search c={level} p50 / p99",
            f"{m['p50_ms']} ms",
            f"p99 {m['p99_ms']} ms, {m['rps']} req/s, {m['errors']} errors",
        )
        for level, m in result["search_http"].items()
    ]
    return rows, {**result, "queries": source, "target_p50_ms": TARGET_P50_MS}


def table(result: dict) -> str:
    lines = [f"POST /search (k={result['k']}, mode {result['mode']}, {result['model_version']})"]
    lines.append(f"{'clients':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'server CPU %':>13}")
    for level, m in result["search_http"].items():
        lines.append(
            f"{level:>8} {m['rps']:>8} {m['p50_ms']!s:>8} {m['p99_ms']!s:>8} {m['errors']:>7} "
            f"{m['server_cpu_pct']!s:>13}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", help="encoder bundle folder or models:/ URI (default: what open_search finds)")
    parser.add_argument("--index", help="the index folder of a --encoder folder (default: the workspace's)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--levels", default="1,8", help="concurrency levels, comma-separated")
    parser.add_argument(
        "--workers", type=int, default=1, help="LMFORGE_WORKERS: server processes (torch threads split)"
    )
    args = parser.parse_args()
    queries, source = load_queries()
    levels = tuple(int(x) for x in args.levels.split(","))
    result = search_http(args.encoder, args.index, queries, levels, args.seconds, args.warmup, args.k, args.workers)
    result.update(
        queries=source,
        target_p50_ms=TARGET_P50_MS,
        machine={"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    )
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
