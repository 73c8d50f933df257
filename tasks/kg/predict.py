"""Run a system (the extractor or the baselines) over gold docs and reduce its predictions to what scoring needs:
per-document counts (tasks/kg/scoring.py COUNTS) and the labeled items behind the per-label tables.

Entities are tagged from the raw text; relations are classified on the gold pairs and links chosen for the gold
mentions, so each task is scored on its own (KG-SPEC "Metrics").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from models.extractor import Extractor, candidate_index, candidate_name
from tasks.kg.baselines import Baselines, candidate_pairs
from tasks.kg.examples import Doc
from tasks.kg.scoring import COUNTS, relation_counts, span_counts


@dataclass
class Outputs:
    """A system's predictions on docs, in doc order: spans, one label per gold pair, one id per linked mention."""

    spans: list[list[dict]]
    relations: list[list[str]]
    links: list[list[str]]


@dataclass
class Scored:
    """Per-document counts and the items of the per-label tables."""

    counts: pd.DataFrame
    gold_entities: list[tuple] = field(default_factory=list)
    pred_entities: list[tuple] = field(default_factory=list)
    gold_relations: list[tuple] = field(default_factory=list)
    pred_relations: list[tuple] = field(default_factory=list)


def _pair_spans(doc: Doc) -> list[tuple]:
    """(head span or None for the subject, tail span) of each gold pair."""
    spans = [(m.start, m.end) for m in doc.mentions]
    return [(None if h < 0 else spans[h], spans[t]) for h, t, _ in doc.pairs]


def _linked(doc: Doc) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in doc.mentions if m.link]


def extractor_outputs(ex: Extractor, docs: list[Doc], batch_size: int = 32) -> Outputs:
    """The extractor's predictions on `docs`."""
    texts = [d.text for d in docs]
    spans, rels, links = ex.annotate(texts, [_pair_spans(d) for d in docs], [_linked(d) for d in docs], batch_size)
    return Outputs(spans, [[lab for lab, _ in r] for r in rels], [[i for i, _ in r] for r in links])


def baseline_outputs(b: Baselines, docs: list[Doc], entities: pd.DataFrame) -> Outputs:
    """The baselines' predictions on `docs`, linking into `entities`."""
    index, ids, modules = candidate_index(entities), entities["id"].tolist(), entities["module"].tolist()
    spans = [b.tag(d.text) for d in docs]
    relations = [[b.relate(d.text, tail) for _, tail in _pair_spans(d)] for d in docs]
    links = [
        [b.link(d.text[s:e], d.module, candidate_pairs(index, ids, modules, d.text[s:e])) for s, e in _linked(d)]
        for d in docs
    ]
    return Outputs(spans, relations, links)


def score_outputs(out: Outputs, docs: list[Doc], entities: pd.DataFrame) -> Scored:
    """Counts per doc (and per-label items) of `out` against the gold of `docs`; ambiguity = candidates in
    `entities` by name."""
    index = candidate_index(entities)
    rows, s = [], Scored(pd.DataFrame())
    for doc, spans, rels, links in zip(docs, out.spans, out.relations, out.links):
        gold = {(doc.id, m.start, m.end, m.label) for m in doc.mentions}
        pred = {(doc.id, p["start"], p["end"], p["label"]) for p in spans}
        gold_rel = [g for *_, g in doc.pairs]
        linked = [m for m in doc.mentions if m.link]
        ambiguous = [len(index.get(candidate_name(doc.text[m.start : m.end]), [])) >= 2 for m in linked]
        right = [p == m.link for m, p in zip(linked, links)]
        counts = (
            *span_counts(gold, pred),
            *relation_counts(gold_rel, rels),
            sum(r for r, a in zip(right, ambiguous) if a),
            sum(ambiguous),
            sum(right),
            len(linked),
        )
        rows.append({"doc_id": doc.id, **dict(zip(COUNTS, counts))})
        s.gold_entities += gold
        s.pred_entities += pred
        s.gold_relations += [(doc.id, h, t, g) for h, t, g in doc.pairs]
        s.pred_relations += [(doc.id, h, t, p) for (h, t, _), p in zip(doc.pairs, rels)]
    s.counts = pd.DataFrame(rows, columns=["doc_id", *COUNTS])
    return s
