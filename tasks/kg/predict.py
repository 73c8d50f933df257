"""Run a system (the extractor or the baselines) over gold docs; tasks/kg/scoring.py reduces its predictions to
per-document counts.

Entities are tagged from the raw text; relations are classified on the gold pairs and links chosen for the gold
mentions, so each task is scored on its own (KG-SPEC "Metrics").
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from models.extractor import Extractor
from models.kb_features import candidate_index
from tasks.kg.baselines import Baselines, candidate_pairs
from tasks.kg.examples import Doc


@dataclass
class Outputs:
    """A system's predictions on docs, in doc order: spans, one label per gold pair, one id per linked mention."""

    spans: list[list[dict]]
    relations: list[list[str]]
    links: list[list[str]]


def _pair_spans(doc: Doc) -> list[tuple]:
    """(head span or None for the subject, tail span) of each gold pair."""
    spans = [(m.start, m.end) for m in doc.mentions]
    return [(None if h < 0 else spans[h], spans[t]) for h, t, _ in doc.pairs]


def _linked(doc: Doc) -> list[tuple[int, int]]:
    return [(m.start, m.end) for m in doc.mentions if m.link]


def extractor_outputs(ex: Extractor, docs: list[Doc], batch_size: int = 32) -> Outputs:
    """The extractor's predictions on `docs`."""
    texts = [d.text for d in docs]
    pairs, linked = [_pair_spans(d) for d in docs], [_linked(d) for d in docs]
    subjects = [d.owner or None for d in docs]
    spans, rels, links = ex.annotate(texts, pairs, linked, batch_size, subjects)
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
