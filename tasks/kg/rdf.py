"""The knowledge graph's RDF vocabulary and the functions that turn the task's tables and the extractor's output
into pyoxigraph quads (every quad lies in the default graph).

Prefix `lf:` = `https://lmforge.dev/kg#`; entities are `https://lmforge.dev/entity/<id>` (the fully qualified
name, percent-encoded where an IRI needs it), docs `https://lmforge.dev/doc/<doc id>`, mentions
`https://lmforge.dev/mention/<doc id>/<m>`, statements `https://lmforge.dev/statement/<hash>`.

    term                                    value    meaning
    lf:Module lf:Class lf:Function          class    an entity's kind (a method is also an lf:Method and an
      lf:Exception                                   lf:Function; an exception is also an lf:Class)
    rdfs:label                              literal  the entity's name (last component)
    lf:module                               IRI      the module entity it is defined in (`builtins` for builtins)
    lf:signature lf:doc lf:sourceFile       literal  `(a, b=None)`, first docstring line, corpus file (absent if "")
    lf:raises lf:returns lf:calls           IRI      a relation between entities; a plain triple only when the AST
      lf:inherits                                    states it
    rdf:Statement (rdf:subject, rdf:predicate, rdf:object)
                                            node     one stated relation, `lf:source "ast"` (exact) or "model"
                                                     (extracted: lf:confidence, lf:modelVersion, lf:fromDoc)
    lf:Doc                                  class    a docstring the models read: lf:documents (the documented
                                                     entity), lf:sourceFile, lf:split
    lf:Mention                              class    an entity mention the model found: lf:inDoc, lf:start, lf:end
                                                     (characters, end exclusive), lf:text, lf:label, lf:confidence;
                                                     lf:refersTo + lf:linkConfidence when linked

Statements are reified (`rdf:Statement`), not RDF 1.2 triple terms: pyoxigraph writes triple terms as `<<( ... )>>`,
which SPARQL 1.1 servers cannot load, and the N-Triples export must load anywhere.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Iterator
from urllib.parse import quote

from pyoxigraph import Literal, NamedNode, Quad

GRAPH_FILE = "graph.nt"
"""In `paths.kg_graph` (and a registered extractor's `graph/` artifact): the N-Triples export."""
STORE_DIR = "store"
"""In `paths.kg_graph`: the pyoxigraph store (RocksDB) folder."""

LF = "https://lmforge.dev/kg#"
ENTITY = "https://lmforge.dev/entity/"
DOC = "https://lmforge.dev/doc/"
MENTION = "https://lmforge.dev/mention/"
STATEMENT = "https://lmforge.dev/statement/"
RDF_NS = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
RDFS_NS = "http://www.w3.org/2000/01/rdf-schema#"
XSD_NS = "http://www.w3.org/2001/XMLSchema#"
PREFIXES = {"lf": LF, "rdf": RDF_NS, "rdfs": RDFS_NS, "xsd": XSD_NS, "ent": ENTITY}
"""The prefixes docs/kg.md's queries use; the query endpoint declares them for every query."""

RELATIONS = ("raises", "returns", "calls", "inherits")
"""The stdlib relation labels, each the local name of its predicate."""
SOURCE_AST, SOURCE_MODEL = "ast", "model"


def lf(name: str) -> NamedNode:
    """The vocabulary term `lf:<name>`."""
    return NamedNode(LF + name)


A = NamedNode(RDF_NS + "type")
LABEL = NamedNode(RDFS_NS + "label")
STATEMENT_CLASS = NamedNode(RDF_NS + "Statement")
SUBJECT, PREDICATE, OBJECT = (NamedNode(RDF_NS + n) for n in ("subject", "predicate", "object"))
DOUBLE, INTEGER = NamedNode(XSD_NS + "double"), NamedNode(XSD_NS + "integer")
KIND_CLASSES = {
    "module": ("Module",),
    "class": ("Class",),
    "function": ("Function",),
    "method": ("Function", "Method"),
    "exception": ("Exception", "Class"),
}
"""The classes an entity of each `kind` is an instance of."""


def _local(value: str) -> str:
    """`value` as an IRI path segment: RFC 3986 unreserved characters kept, everything else percent-encoded."""
    return quote(value, safe="._-~")


def entity_iri(entity_id: str) -> NamedNode:
    """The IRI of entity `entity_id` (`email.message.Message` -> `https://lmforge.dev/entity/email.message.Message`)."""
    return NamedNode(ENTITY + _local(entity_id))


def doc_iri(doc_id: str) -> NamedNode:
    """The IRI of the doc `doc_id`."""
    return NamedNode(DOC + _local(doc_id))


def mention_iri(doc_id: str, m: int) -> NamedNode:
    """The IRI of mention `m` of doc `doc_id`."""
    return NamedNode(f"{MENTION}{_local(doc_id)}/{m}")


def relation_predicate(label: str) -> NamedNode:
    """`lf:<label>` (`raises` -> lf:raises); a user's own relation labels get a predicate each the same way."""
    return lf(_local(label))


def _text(value) -> Literal:
    return Literal(str(value))


def entity_quads(entities: Iterable[dict]) -> Iterator[Quad]:
    """Each entity's kind classes, label, module and (when not empty) signature, doc and source file."""
    for e in entities:
        node = entity_iri(e["id"])
        for cls in KIND_CLASSES.get(e["kind"], ()):
            yield Quad(node, A, lf(cls))
        yield Quad(node, LABEL, _text(e["name"]))
        if e["module"]:
            yield Quad(node, lf("module"), entity_iri(e["module"]))
        for key, prop in (("signature", "signature"), ("doc", "doc"), ("source", "sourceFile")):
            if e.get(key):
                yield Quad(node, lf(prop), _text(e[key]))


def doc_quads(docs: Iterable[dict]) -> Iterator[Quad]:
    """Each doc as an `lf:Doc` with the entity it documents, its file and split (the text stays in the tables)."""
    for d in docs:
        node = doc_iri(d["id"])
        yield Quad(node, A, lf("Doc"))
        if d.get("owner"):
            yield Quad(node, lf("documents"), entity_iri(d["owner"]))
        if d.get("source"):
            yield Quad(node, lf("sourceFile"), _text(d["source"]))
        yield Quad(node, lf("split"), _text(d["split"]))


def _statement(source: str, head: str, label: str, tail: str, where: str = "") -> tuple[NamedNode, list[Quad]]:
    """A reified statement node for (head, label, tail) and its rdf:Statement quads; one node per source and
    `where` (the place in the text that states it; "" for the AST)."""
    key = "\x1f".join((source, head, label, tail, where)).encode()
    node = NamedNode(STATEMENT + hashlib.sha256(key).hexdigest()[:24])
    return node, [
        Quad(node, A, STATEMENT_CLASS),
        Quad(node, SUBJECT, entity_iri(head)),
        Quad(node, PREDICATE, relation_predicate(label)),
        Quad(node, OBJECT, entity_iri(tail)),
        Quad(node, lf("source"), _text(source)),
    ]


def fact_quads(facts: Iterable[dict]) -> Iterator[Quad]:
    """Each AST fact as a plain triple (head, lf:<relation>, tail) and as a statement marked `lf:source "ast"`."""
    for f in facts:
        yield Quad(entity_iri(f["head"]), relation_predicate(f["relation"]), entity_iri(f["tail"]))
        yield from _statement(SOURCE_AST, f["head"], f["relation"], f["tail"])[1]


def kept_mentions(extraction: dict, min_confidence: float = 0.0) -> list[tuple[int, dict]]:
    """(index, entity) of the extracted mentions scored at least `min_confidence`."""
    return [(m, e) for m, e in enumerate(extraction["entities"]) if e["score"] >= min_confidence]


def kept_relations(doc: dict, extraction: dict, min_confidence: float = 0.0) -> list[dict]:
    """The extracted relations scored at least `min_confidence` whose ends are both entities (the head -1 is the
    doc's owner, any other end a mention linked to an entity), with `head_id` and `tail_id` added."""
    entities, kept = extraction["entities"], []
    for rel in extraction["relations"]:
        head = doc.get("owner", "") if rel["head"] == -1 else _link(entities, rel["head"])
        tail = _link(entities, rel["tail"])
        if head and tail and rel["score"] >= min_confidence:
            kept.append({**rel, "head_id": head, "tail_id": tail})
    return kept


def extracted_quads(doc: dict, extraction: dict, model_version: str, min_confidence: float = 0.0) -> Iterator[Quad]:
    """The mentions and relations the extractor found in `doc` (a docs row; extraction = one item of
    `Extractor.extract`) that `kept_mentions` and `kept_relations` keep.

    Extracted relations are never asserted as plain triples (only the AST's are): a query that wants them asks
    for `lf:source "model"` statements and their confidence.
    """
    doc_id = doc["id"]
    for m, ent in kept_mentions(extraction, min_confidence):
        yield from mention_quads(doc_id, m, ent)
    for rel in kept_relations(doc, extraction, min_confidence):
        where = f"{doc_id}\x1f{rel['head']}\x1f{rel['tail']}"  # one statement per mention pair of the doc
        node, quads = _statement(SOURCE_MODEL, rel["head_id"], rel["label"], rel["tail_id"], where)
        yield from quads
        yield Quad(node, lf("confidence"), Literal(repr(float(rel["score"])), datatype=DOUBLE))
        yield Quad(node, lf("modelVersion"), _text(model_version))
        yield Quad(node, lf("fromDoc"), doc_iri(doc_id))


def _link(entities: list[dict], index: int) -> str:
    return entities[index].get("link", "") if 0 <= index < len(entities) else ""


def mention_quads(doc_id: str, m: int, ent: dict) -> Iterator[Quad]:
    """One `lf:Mention` node: where it lies, what it says, its label and score, and the entity it is linked to."""
    node = mention_iri(doc_id, m)
    yield Quad(node, A, lf("Mention"))
    yield Quad(node, lf("inDoc"), doc_iri(doc_id))
    yield Quad(node, lf("start"), Literal(str(int(ent["start"])), datatype=INTEGER))
    yield Quad(node, lf("end"), Literal(str(int(ent["end"])), datatype=INTEGER))
    yield Quad(node, lf("text"), _text(ent["text"]))
    yield Quad(node, lf("label"), _text(ent["label"]))
    yield Quad(node, lf("confidence"), Literal(repr(float(ent["score"])), datatype=DOUBLE))
    if ent.get("link"):
        yield Quad(node, lf("refersTo"), entity_iri(ent["link"]))
        yield Quad(node, lf("linkConfidence"), Literal(repr(float(ent.get("link_score", 0.0))), datatype=DOUBLE))
