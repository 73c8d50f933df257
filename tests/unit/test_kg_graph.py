"""kg_graph and the read-only SPARQL endpoint's core: triples from small task tables, the N-Triples export,
one- and two-hop queries, refusals, the row limit and the timeout."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from conftest import make_paths
from pyoxigraph import DefaultGraph, RdfFormat, Store

from deploy.sparql import GraphQueries, QueryRefused, QueryTimeout, check_query, load_graph, run_query
from tasks.kg import graph
from tasks.kg.rdf import GRAPH_FILE, STORE_DIR
from tasks.shared.config.kg_graph import KgGraphConfig

ENTITIES = [
    ("builtins.ValueError", "ValueError", "exception", "builtins", "", "", "Inappropriate argument value."),
    ("json", "json", "module", "json", "json/__init__.py", "", "JSON encoder and decoder."),
    ("json.loads", "loads", "function", "json", "json/__init__.py", "(s, **kw)", "Deserialize s."),
    ("json.decoder", "decoder", "module", "json.decoder", "json/decoder.py", "", "Implementation of JSONDecoder."),
    ("json.decoder.JSONDecodeError", "JSONDecodeError", "exception", "json.decoder", "json/decoder.py", "", ""),
    ("json.decoder.JSONDecoder", "JSONDecoder", "class", "json.decoder", "json/decoder.py", "", "Simple decoder."),
    ("json.decoder.JSONDecoder.decode", "decode", "method", "json.decoder", "json/decoder.py", "(self, s)", ""),
]
FACTS = [
    ("json.loads", "calls", "json.decoder.JSONDecoder.decode"),
    ("json.decoder.JSONDecoder.decode", "raises", "json.decoder.JSONDecodeError"),
    ("json.decoder.JSONDecodeError", "inherits", "builtins.ValueError"),
    ("json.loads", "raises", "builtins.ValueError"),
]
LOADS_DOC = "Deserialize s to a Python object.\n\nRaises JSONDecodeError if s is not valid JSON."
DOCS = [
    ("json/__init__.py#loads", LOADS_DOC, "json/__init__.py", "json", "json.loads", "train"),
    ("json/decoder.py#JSONDecoder", "Simple JSON decoder.", "json/decoder.py", "json.decoder", "", "test"),
]


class FakeExtractor:
    """Stand-in with models/extractor.py's interface: links every `JSONDecodeError` it sees and says the doc's
    subject raises it; one low-scored mention of `JSON` that min_confidence must drop."""

    version = "fake00000000"

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def extract(self, texts, subjects=None, batch_size=32):
        self.calls.append((len(texts), batch_size))
        return [self._one(t) for t in texts]

    @staticmethod
    def _one(text: str) -> dict:
        entities, relations = [], []
        if (i := text.find("JSON ")) >= 0:
            entities.append({"start": i, "end": i + 4, "text": "JSON", "label": "module", "score": 0.1, "link": "json",
                             "link_score": 0.2})  # fmt: skip
        if (i := text.find("JSONDecodeError")) >= 0:
            link = "json.decoder.JSONDecodeError"
            entities.append({"start": i, "end": i + 15, "text": "JSONDecodeError", "label": "exception",
                             "score": 0.9, "link": link, "link_score": 0.8})  # fmt: skip
            relations.append({"head": -1, "tail": len(entities) - 1, "label": "raises", "score": 0.75})
        return {"entities": entities, "relations": relations}


def write_tables(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cols = {
        "entities": ["id", "name", "kind", "module", "source", "signature", "doc"],
        "docs": ["id", "text", "source", "module", "owner", "split"],
        "facts": ["head", "relation", "tail"],
    }
    for name, rows in (("entities", ENTITIES), ("docs", DOCS), ("facts", FACTS)):
        pd.DataFrame(rows, columns=cols[name]).to_parquet(folder / f"{name}.parquet")


@pytest.fixture
def built(tmp_path):
    """The graph stage run on the small tables with the stand-in extractor: (paths, result, extractor)."""
    paths = make_paths(tmp_path)
    write_tables(paths.kg_data)
    ex = FakeExtractor()
    result = graph.run(KgGraphConfig(batch_size=8, min_confidence=0.5), paths, extractor=ex)
    return paths, result, ex


def test_graph_counts_entities_relations_mentions_and_triples(built):
    paths, result, ex = built
    assert ex.calls == [(2, 8)]  # every doc of every split, at the configured batch size
    assert (result.entities, result.relations_ast, result.relations_model, result.mentions) == (7, 4, 1, 1)
    assert result.relations == 5 and result.docs == 2 and result.model_version == "fake00000000"
    store = Store.read_only(str(paths.kg_graph / STORE_DIR))
    assert len(store) == result.triples > 0
    assert result.build_seconds >= result.extract_seconds >= 0 and result.docs_per_second > 0


def test_the_n_triples_export_reloads_into_a_fresh_store_with_the_same_triples(built):
    paths, result, _ = built
    fresh = Store()
    fresh.load(path=str(paths.kg_graph / GRAPH_FILE), format=RdfFormat.N_TRIPLES)
    assert len(fresh) == result.triples
    original = Store.read_only(str(paths.kg_graph / STORE_DIR))
    assert fresh.dump(format=RdfFormat.N_TRIPLES, from_graph=DefaultGraph()).count(b"\n") == result.triples
    assert set(original) == set(fresh)


def test_a_rebuild_gives_the_same_graph_and_replaces_the_old_one(built, tmp_path):
    paths, result, _ = built
    before = (paths.kg_graph / GRAPH_FILE).read_bytes()
    again = graph.run(KgGraphConfig(batch_size=8, min_confidence=0.5), paths, extractor=FakeExtractor())
    assert again.triples == result.triples
    assert sorted((paths.kg_graph / GRAPH_FILE).read_bytes().splitlines()) == sorted(before.splitlines())
    assert sorted(p.name for p in paths.kg_graph.iterdir()) == [GRAPH_FILE, STORE_DIR]


ONE_HOP = "SELECT ?f WHERE { ?f a lf:Function ; lf:raises ent:builtins.ValueError } ORDER BY ?f"
TWO_HOP = """SELECT ?f ?e WHERE {
  ?f lf:raises ?e . ?e lf:inherits ent:builtins.ValueError .   # raises a subclass of ValueError
} ORDER BY ?f"""
EXTRACTED = """SELECT ?head ?tail ?confidence ?doc ?version WHERE {
  ?s a rdf:Statement ; lf:source "model" ; rdf:subject ?head ; rdf:predicate lf:raises ; rdf:object ?tail ;
     lf:confidence ?confidence ; lf:fromDoc ?doc ; lf:modelVersion ?version .
}"""
MENTIONS = "SELECT ?text ?e WHERE { ?m a lf:Mention ; lf:text ?text ; lf:refersTo ?e }"


def _values(answer: dict, var: str) -> list[str]:
    return [row[var]["value"] for row in answer["rows"]]


def test_one_hop_and_two_hop_queries_answer_from_the_ast(built):
    store = load_graph(built[0].kg_graph / GRAPH_FILE)
    ent = "https://lmforge.dev/entity/"
    assert _values(run_query(store, ONE_HOP, 100), "f") == [f"{ent}json.loads"]
    two = run_query(store, TWO_HOP, 100)
    assert two["vars"] == ["f", "e"] and two["truncated"] is False
    assert [(r["f"]["value"], r["e"]["value"]) for r in two["rows"]] == [
        (f"{ent}json.decoder.JSONDecoder.decode", f"{ent}json.decoder.JSONDecodeError")
    ]
    assert run_query(store, "ASK { ent:json.loads lf:calls ?x }", 10) == {"boolean": True}


def test_extracted_relations_and_mentions_carry_confidence_version_and_doc(built):
    store = load_graph(built[0].kg_graph / GRAPH_FILE)
    (row,) = run_query(store, EXTRACTED, 10)["rows"]
    assert row["head"]["value"].endswith("/json.loads") and row["tail"]["value"].endswith(".JSONDecodeError")
    assert row["confidence"] == {
        "type": "literal",
        "value": "0.75",
        "datatype": "http://www.w3.org/2001/XMLSchema#double",
    }
    assert row["version"]["value"] == "fake00000000" and row["doc"]["value"].endswith("json%2F__init__.py%23loads")
    # the low-scored `JSON` mention is below min_confidence; the plain triple json.loads raises JSONDecodeError
    # is not asserted (only the AST's relations are plain triples)
    assert _values(run_query(store, MENTIONS, 10), "text") == ["JSONDecodeError"]
    # a local name with two dots needs the full IRI: pyoxigraph 0.5.13 refuses `ent:json.decoder.JSONDecodeError`
    ask = "ASK { ent:json.loads lf:raises <https://lmforge.dev/entity/json.decoder.JSONDecodeError> }"
    assert run_query(store, ask, 1) == {"boolean": False}


@pytest.mark.parametrize(
    ("sparql", "why"),
    [
        ("INSERT DATA { <http://a> <http://b> <http://c> }", "INSERT is refused"),
        ("PREFIX x: <http://x/>\nDELETE WHERE { ?s ?p ?o }", "DELETE is refused"),
        ("LOAD <http://example.org/data.nt>", "LOAD is refused"),
        ("CLEAR ALL", "CLEAR is refused"),
        ("SELECT * WHERE { SERVICE <http://example.org/sparql> { ?s ?p ?o } }", "SERVICE is refused"),
        ("select * where { service silent <http://example.org/sparql> { ?s ?p ?o } }", "SERVICE is refused"),
        ("CONSTRUCT WHERE { ?s ?p ?o }", "CONSTRUCT builds triples"),
        ("# a comment: SELECT\nDESCRIBE <http://e/x>", "DESCRIBE builds triples"),
        ("SELEC ?x WHERE { ?x ?p ?o }", "not a SPARQL query"),
        ("", "not a SPARQL query"),
    ],
)
def test_updates_service_construct_and_non_queries_are_refused(sparql, why):
    with pytest.raises(QueryRefused, match=why):
        check_query(sparql)


def test_keywords_inside_strings_iris_and_variables_are_not_mistaken_for_forms():
    assert check_query("SELECT ?service ?load WHERE { ?service <http://x/SERVICE> 'INSERT SERVICE' }") == "SELECT"
    assert check_query('PREFIX delete: <http://x/>\nASK { delete:service ?p """LOAD\nDROP""" }') == "ASK"


def test_invalid_sparql_is_refused_with_pyoxigraph_s_reason(built):
    store = load_graph(built[0].kg_graph / GRAPH_FILE)
    with pytest.raises(QueryRefused, match="invalid SPARQL"):
        run_query(store, "SELECT ?x WHERE { ?x ", 10)


def test_the_row_limit_cuts_and_says_so(built):
    store = load_graph(built[0].kg_graph / GRAPH_FILE)
    answer = run_query(store, "SELECT ?s ?p ?o WHERE { ?s ?p ?o }", 3)
    assert len(answer["rows"]) == 3 and answer["truncated"] is True


PATHOLOGICAL = "SELECT (COUNT(*) AS ?n) WHERE { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"


def test_a_query_past_the_timeout_is_stopped_and_the_next_one_is_answered(built):
    queries = GraphQueries(built[0].kg_graph / GRAPH_FILE, timeout=1.0, max_rows=2)
    try:
        assert queries.triples == built[1].triples
        assert len(queries.query("SELECT * WHERE { ?s ?p ?o }")["rows"]) == 2
        first = queries._all[0].proc.pid  # noqa: SLF001 - the test checks the runaway worker is really gone
        t = time.monotonic()
        with pytest.raises(QueryTimeout, match="1 s limit"):
            queries.query(PATHOLOGICAL)
        assert time.monotonic() - t < 5
        with pytest.raises(ProcessLookupError):
            import os

            os.kill(first, 0)
        assert queries.query(ONE_HOP, max_rows=5)["rows"][0]["f"]["value"].endswith("/json.loads")
        with pytest.raises(QueryRefused, match="SERVICE"):
            queries.query("SELECT * { SERVICE <http://example.org/> { ?s ?p ?o } }")
    finally:
        queries.close()
