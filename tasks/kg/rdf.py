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


def _triple(s: NamedNode, p: NamedNode, o) -> Quad:
    return Quad(s, p, o)


def _text(value) -> Literal:
    return Literal(str(value))


def entity_quads(entities: Iterable[dict]) -> Iterator[Quad]:
    """Each entity's kind classes, label, module and (when not empty) signature, doc and source file."""
    for e in entities:
        node = entity_iri(e["id"])
        for cls in KIND_CLASSES.get(e["kind"], ()):
            yield _triple(node, A, lf(cls))
        yield _triple(node, LABEL, _text(e["name"]))
        if e["module"]:
            yield _triple(node, lf("module"), entity_iri(e["module"]))
        for key, prop in (("signature", "signature"), ("doc", "doc"), ("source", "sourceFile")):
            if e.get(key):
                yield _triple(node, lf(prop), _text(e[key]))


def doc_quads(docs: Iterable[dict]) -> Iterator[Quad]:
    """Each doc as an `lf:Doc` with the entity it documents, its file and split (the text stays in the tables)."""
    for d in docs:
        node = doc_iri(d["id"])
        yield _triple(node, A, lf("Doc"))
        if d.get("owner"):
            yield _triple(node, lf("documents"), entity_iri(d["owner"]))
        if d.get("source"):
            yield _triple(node, lf("sourceFile"), _text(d["source"]))
        yield _triple(node, lf("split"), _text(d["split"]))


def _statement(source: str, head: str, label: str, tail: str, doc_id: str = "") -> tuple[NamedNode, list[Quad]]:
    """A reified statement node for (head, label, tail) and its rdf:Statement quads; one node per source and doc."""
    key = "\x1f".join((source, head, label, tail, doc_id)).encode()
    node = NamedNode(STATEMENT + hashlib.sha256(key).hexdigest()[:24])
    return node, [
        _triple(node, A, STATEMENT_CLASS),
        _triple(node, SUBJECT, entity_iri(head)),
        _triple(node, PREDICATE, relation_predicate(label)),
        _triple(node, OBJECT, entity_iri(tail)),
        _triple(node, lf("source"), _text(source)),
    ]


def fact_quads(facts: Iterable[dict]) -> Iterator[Quad]:
    """Each AST fact as a plain triple (head, lf:<relation>, tail) and as a statement marked `lf:source "ast"`."""
    for f in facts:
        yield _triple(entity_iri(f["head"]), relation_predicate(f["relation"]), entity_iri(f["tail"]))
        yield from _statement(SOURCE_AST, f["head"], f["relation"], f["tail"])[1]


def extracted_quads(doc: dict, extraction: dict, model_version: str, min_confidence: float = 0.0) -> Iterator[Quad]:
    """The mentions and relations the extractor found in `doc` (a docs row; extraction = one item of
    `Extractor.extract`), those scored below `min_confidence` left out.

    A relation becomes a statement only when both ends are entities: the head -1 is the doc's owner, any other
    end a mention linked to an entity. Extracted relations are never asserted as plain triples (only the AST's
    are): a query that wants them asks for `lf:source "model"` statements and their confidence.
    """
    doc_id, entities = doc["id"], extraction["entities"]
    for m, ent in enumerate(entities):
        if ent["score"] >= min_confidence:
            yield from mention_quads(doc_id, m, ent)
    for rel in extraction["relations"]:
        head = doc.get("owner", "") if rel["head"] == -1 else _link(entities, rel["head"])
        tail = _link(entities, rel["tail"])
        if not head or not tail or rel["score"] < min_confidence:
            continue
        node, quads = _statement(SOURCE_MODEL, head, rel["label"], tail, doc_id)
        yield from quads
        yield _triple(node, lf("confidence"), Literal(repr(float(rel["score"])), datatype=DOUBLE))
        yield _triple(node, lf("modelVersion"), _text(model_version))
        yield _triple(node, lf("fromDoc"), doc_iri(doc_id))


def _link(entities: list[dict], index: int) -> str:
    return entities[index].get("link", "") if 0 <= index < len(entities) else ""


def mention_quads(doc_id: str, m: int, ent: dict) -> Iterator[Quad]:
    """One `lf:Mention` node: where it lies, what it says, its label and score, and the entity it is linked to."""
    node = mention_iri(doc_id, m)
    yield _triple(node, A, lf("Mention"))
    yield _triple(node, lf("inDoc"), doc_iri(doc_id))
    yield _triple(node, lf("start"), Literal(str(int(ent["start"])), datatype=INTEGER))
    yield _triple(node, lf("end"), Literal(str(int(ent["end"])), datatype=INTEGER))
    yield _triple(node, lf("text"), _text(ent["text"]))
    yield _triple(node, lf("label"), _text(ent["label"]))
    yield _triple(node, lf("confidence"), Literal(repr(float(ent["score"])), datatype=DOUBLE))
    if ent.get("link"):
        yield _triple(node, lf("refersTo"), entity_iri(ent["link"]))
        yield _triple(node, lf("linkConfidence"), Literal(repr(float(ent.get("link_score", 0.0))), datatype=DOUBLE))
