"""Read-only SPARQL over the knowledge graph, bounded in rows and time (POST /graph/query, gRPC GraphQuery).

A query is checked before it runs (`check_query`): SELECT and ASK pass; CONSTRUCT, DESCRIBE, every update
(INSERT, DELETE, LOAD, CLEAR, ...) and any `SERVICE` are refused with QueryRefused (HTTP 400, gRPC
INVALID_ARGUMENT). pyoxigraph offers no parsed-query object to inspect, so the check reads the query's tokens
(comments, strings, IRIs, variables and prefixed names skipped); pyoxigraph then parses the query itself, and a
query that still turns out to build triples is refused before a triple is read. The check matters: pyoxigraph
executes `SERVICE` over HTTP.

pyoxigraph's `Store.query` has no timeout or cancellation, so queries run in worker processes
(`python -m deploy.sparql <graph.nt>`, each holding the graph in memory) that are killed and restarted when a
query runs past the timeout (QueryTimeout: HTTP 408, gRPC DEADLINE_EXCEEDED): the time limit really bounds the
work, a runaway join cannot keep a core busy after its answer was given up.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from pyoxigraph import BlankNode, Literal, NamedNode, QueryBoolean, QuerySolutions, RdfFormat, Store

from tasks.kg.rdf import PREFIXES

ROOT = Path(__file__).resolve().parent.parent
"""The folder holding `deploy/` (the repository, or a Bento's src/): the workers run from there."""
QUERY_FORMS = {"SELECT", "ASK"}
LOAD_SECONDS = 300
"""How long a worker may take to load the graph."""
REFUSED_FORMS = {"CONSTRUCT": "builds triples", "DESCRIBE": "builds triples"}
UPDATES = {"INSERT", "DELETE", "LOAD", "CLEAR", "DROP", "CREATE", "ADD", "MOVE", "COPY", "WITH"}
_TOKEN = re.compile(
    r"""(?P<skip>\#[^\n]*
      |\"\"\"(?:[^"\\]|\\.|"(?!""))*\"\"\"|'''(?:[^'\\]|\\.|'(?!''))*'''
      |"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'
      |<[^<>"{}|^`\\\x00-\x20]*>
      |[?$]\w+
      |[A-Za-z_][\w.-]*:[\w.:%-]*|:[\w.:%-]*)
    |(?P<word>[A-Za-z]+)
    |\S""",
    re.X,
)


class QueryRefused(ValueError):
    """Not a read-only SELECT/ASK query, or not valid SPARQL (HTTP 400, gRPC INVALID_ARGUMENT)."""


class QueryTimeout(Exception):
    """The query ran past the time limit and its worker was stopped (HTTP 408, gRPC DEADLINE_EXCEEDED)."""


def keywords(sparql: str) -> list[str]:
    """The query's keywords, upper-cased, in order (comments, strings, IRIs, variables, prefixed names left out)."""
    return [m.group("word").upper() for m in _TOKEN.finditer(sparql) if m.group("word")]


def check_query(sparql: str) -> str:
    """The form (`SELECT` or `ASK`) of a read-only query; anything else raises QueryRefused naming why."""
    words = keywords(sparql)
    if "SERVICE" in words:
        raise QueryRefused("SERVICE is refused: this endpoint queries the local graph only")
    form = next((w for w in words if w not in ("PREFIX", "BASE")), "")
    if form in UPDATES:
        raise QueryRefused(f"{form} is refused: the graph is read-only (send a SELECT or ASK query)")
    if form in REFUSED_FORMS:
        raise QueryRefused(f"{form} {REFUSED_FORMS[form]}: only SELECT and ASK queries are answered")
    if form not in QUERY_FORMS:
        raise QueryRefused("not a SPARQL query: expected PREFIX/BASE declarations, then SELECT or ASK")
    return form


def term_json(term) -> dict:
    """An RDF term as SPARQL 1.1 JSON results write it: type, value, and a literal's datatype or language."""
    if isinstance(term, NamedNode):
        return {"type": "uri", "value": term.value}
    if isinstance(term, BlankNode):
        return {"type": "bnode", "value": term.value}
    if isinstance(term, Literal):
        if term.language:
            return {"type": "literal", "value": term.value, "lang": term.language}
        return {"type": "literal", "value": term.value, "datatype": term.datatype.value}
    return {"type": "triple", "value": str(term)}


def run_query(store: Store, sparql: str, max_rows: int) -> dict:
    """Answer a checked read-only query in this process: SELECT -> vars, rows (at most `max_rows`) and whether
    rows were cut; ASK -> boolean.

    Raises:
        QueryRefused: the query is not read-only SELECT/ASK or not valid SPARQL.
    """
    check_query(sparql)
    try:
        result = store.query(sparql, prefixes=PREFIXES)
        if isinstance(result, QueryBoolean):
            return {"boolean": bool(result)}
        if not isinstance(result, QuerySolutions):  # CONSTRUCT/DESCRIBE the check missed: refused before any work
            raise QueryRefused("only SELECT and ASK queries are answered")
        names = [v.value for v in result.variables]
        rows = []
        for solution in result:
            if len(rows) == max_rows:
                return {"vars": names, "rows": rows, "truncated": True}
            rows.append({n: term_json(t) for n, t in zip(names, solution) if t is not None})
        return {"vars": names, "rows": rows, "truncated": False}
    except SyntaxError as e:
        raise QueryRefused(f"invalid SPARQL: {' '.join(str(e).split())}") from None
    except OSError as e:  # an evaluation error (a type error in a function, ...): the query's fault, not the server's
        raise QueryRefused(f"query failed: {' '.join(str(e).split())}") from None


def load_graph(path: Path | str) -> Store:
    """An in-memory store holding the N-Triples file at `path`."""
    store = Store()
    store.load(path=str(path), format=RdfFormat.N_TRIPLES)
    return store


class _Worker:
    """One `python -m deploy.sparql` process: a query per JSON line in, an answer per JSON line out."""

    def __init__(self, graph: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.sparql", str(graph)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self.ready = False

    def answer(self, deadline: float) -> dict | None:
        """The next JSON line the worker writes, or None past `deadline` (time.monotonic) or if it died."""
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def wait_ready(self, seconds: float) -> bool:
        """Wait until the worker has loaded the graph (its first line); False if it died or took too long."""
        self.ready = self.ready or self.answer(time.monotonic() + seconds) is not None
        return self.ready

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):  # a pipe to a dead worker
                f.close()


class GraphQueries:
    """Read-only queries on one graph, answered by `workers` worker processes within `timeout` seconds each
    (the wait for a free worker included); a worker past the deadline is killed and replaced."""

    def __init__(self, graph: Path | str, workers: int = 1, timeout: float = 5.0, max_rows: int = 1000) -> None:
        self.graph, self.timeout, self.max_rows = Path(graph).resolve(), timeout, max_rows
        if not self.graph.is_file():
            raise FileNotFoundError(f"{self.graph}: no such graph file")
        self.triples = sum(1 for _ in self.graph.open("rb"))
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        started = [self._start() for _ in range(workers)]
        for w in started:
            if not w.wait_ready(LOAD_SECONDS):
                self.close()
                raise RuntimeError(f"{self.graph}: the graph worker could not load it (see its error above)")
            self._release(w)

    def _start(self) -> _Worker:
        w = _Worker(self.graph)
        with self._lock:
            self._all.append(w)
        return w

    def _release(self, w: _Worker) -> None:
        self._idle.put(w)

    def _replace(self, w: _Worker) -> None:
        w.stop()
        with self._lock:
            self._all.remove(w)
        self._release(self._start())

    def query(self, sparql: str, max_rows: int | None = None) -> dict:
        """`run_query`'s answer from a worker process.

        Raises:
            QueryRefused: see `check_query` (checked here first, so a refusal costs no worker).
            QueryTimeout: no answer within the timeout (the worker is killed and replaced).
        """
        check_query(sparql)
        deadline = time.monotonic() + self.timeout
        try:
            w = self._idle.get(timeout=self.timeout)
        except queue.Empty:
            raise QueryTimeout(f"every graph worker stayed busy for the {self.timeout:g} s limit") from None
        try:
            if not w.ready:  # a replacement first loads the graph: not counted against the query
                w.wait_ready(LOAD_SECONDS)
                deadline = time.monotonic() + self.timeout
            w.proc.stdin.write(json.dumps({"sparql": sparql, "max_rows": max_rows or self.max_rows}) + "\n")
            w.proc.stdin.flush()
            reply = w.answer(deadline)
        except (OSError, ValueError):
            reply = None
        if reply is None:
            self._replace(w)
            raise QueryTimeout(f"the query ran past the {self.timeout:g} s limit and was stopped")
        self._release(w)
        if "refused" in reply:
            raise QueryRefused(reply["refused"])
        return reply["result"]

    def close(self) -> None:
        """Stop every worker."""
        with self._lock:
            workers, self._all = self._all, []
        for w in workers:
            w.stop()


def serve(graph: Path) -> None:
    """The worker loop: load the graph, say so, then answer one query per line until stdin closes."""
    store = load_graph(graph)
    print(json.dumps({"ready": len(store)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = {"result": run_query(store, request["sparql"], request["max_rows"])}
        except QueryRefused as e:
            reply = {"refused": str(e)}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m deploy.sparql <graph.nt>`: a query worker (started by GraphQueries, not by hand)."""
    parser = argparse.ArgumentParser(prog="python -m deploy.sparql", description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path)
    serve(parser.parse_args(argv).graph)


if __name__ == "__main__":
    main()
