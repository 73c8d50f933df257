"""The knowledge-graph task served: /extract latency, graph build throughput, SPARQL latency.

    make pipeline                      # builds the task data, the extractor and the graph (or: dvc repro kg_graph)
    python bench/extract.py            # or: lmforge bench extract
    python bench/extract.py --reps 200 --threads 2

Times, in one process on this machine, with the serving code itself (deploy/core.py's `extract`, deploy/sparql.py's
worker processes; no HTTP in between): /extract's p50 for one text of 64 tokens and for a batch of 32, the graph
build of kg_graph (tasks/kg/graph.py's `run` into a temporary folder: docs per second, extraction included), and
the p50 of a one-hop and a two-hop SPARQL query on the built graph (worker round trip included). Prints a table,
and as the last line a JSON object with every number and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.core import extract  # noqa: E402
from deploy.resolve import ServedKG  # noqa: E402
from deploy.sparql import GraphQueries  # noqa: E402
from tasks.kg import graph  # noqa: E402
from tasks.kg.rdf import GRAPH_FILE  # noqa: E402
from tasks.shared.config.params import load_params  # noqa: E402

ONE_HOP = "SELECT ?f WHERE { ?f lf:raises <https://lmforge.dev/entity/builtins.ValueError> }"
TWO_HOP = "SELECT ?f ?e WHERE { ?f lf:raises ?e . ?e lf:inherits <https://lmforge.dev/entity/builtins.ValueError> }"
TEXT = (
    "Return a new Message object parsed from the bytes in s. Raises ValueError if the header is malformed and "
    "calls email.parser.BytesParser to read it; see email.message.Message for the result."
)


def p50_ms(fn, reps: int) -> float:
    """The median wall time of `fn()` in milliseconds, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def text_of_tokens(extractor, n: int) -> str:
    """A docstring-like text cut to `n` tokens of the extractor's tokenizer (when it exposes one)."""
    tok = getattr(extractor, "tokenizer", None)
    text = " ".join([TEXT] * 4)
    if tok is None:
        return text
    ids = tok.encode(text).ids[:n]
    return tok.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=100, help="timed calls per latency")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    params = load_params()
    paths, cfg = params.paths, params.kg_graph
    extractor = graph.load_extractor(paths.kg_model)
    kg = ServedKG(extractor, None, str(paths.kg_model), "folder")
    text = text_of_tokens(extractor, 64)
    b1 = p50_ms(lambda: extract(kg, [text]), args.reps)
    b32 = p50_ms(lambda: extract(kg, [text] * 32), max(10, args.reps // 10))
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        built = graph.run(cfg, paths.model_copy(update={"kg_graph": Path(tmp) / "graph"}), extractor=extractor)
        queries = GraphQueries(Path(tmp) / "graph" / GRAPH_FILE, timeout=30, max_rows=1000)
        try:
            one = p50_ms(lambda: queries.query(ONE_HOP), args.reps)
            two = p50_ms(lambda: queries.query(TWO_HOP), args.reps)
            answers = (len(queries.query(ONE_HOP)["rows"]), len(queries.query(TWO_HOP)["rows"]))
        finally:
            queries.close()
    rows = [
        ("/extract p50, batch 1 (64 tokens)", f"{b1:.2f} ms", "<= 10 ms" if b1 <= 10 else "MISSED (10 ms)"),
        ("/extract p50, batch 32", f"{b32:.2f} ms", f"{32000 / b32:.0f} texts/s"),
        ("graph build", f"{built.build_seconds:.1f} s", f"{built.docs_per_second:.1f} docs/s, {built.docs} docs"),
        ("graph size", f"{built.triples:,} triples", f"{built.entities:,} entities, {built.mentions:,} mentions"),
        ("SPARQL p50, one hop", f"{one:.3f} ms", f"{answers[0]} rows"),
        ("SPARQL p50, two hops", f"{two:.3f} ms", f"{answers[1]} rows"),
    ]
    for what, value, note in rows:
        print(f"{what:<36} {value:>18}  {note}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads"
    print(
        json.dumps(
            {
                "machine": machine,
                "via": "core (deploy/core.py extract, deploy/sparql.py workers), no HTTP",
                "extract_p50_ms_b1": b1,
                "extract_p50_ms_b32": b32,
                "graph_build_seconds": built.build_seconds,
                "graph_extract_seconds": built.extract_seconds,
                "graph_docs_per_second": built.docs_per_second,
                "graph_triples": built.triples,
                "sparql_p50_ms_one_hop": one,
                "sparql_p50_ms_two_hop": two,
                "model_version": built.model_version,
            }
        )
    )


if __name__ == "__main__":
    main()
