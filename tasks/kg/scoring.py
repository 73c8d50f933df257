"""Scores of the kg task, their bootstrap intervals and paired comparisons, all from per-document counts.

- entity F1: micro-F1 of exact (start, end, label) spans, seqeval's strict definition;
- relation F1: micro-F1 over the non-`none` labels of the gold candidate pairs (relation classification);
- linking accuracy: share of gold mentions with a link and at least 2 candidates whose predicted id is the gold
  one (`linking_accuracy`), and over every mention with a link (`linking_accuracy_all`).

Each system's predictions (tasks/kg/predict.py) reduce to a few counts per test document (COUNTS, `score_outputs`;
`document_counts` runs an extractor on chosen docs and counts in one call), so intervals and comparisons are a
paired bootstrap over documents: one seeded matrix of resampled documents (`tasks.shared.stats.Resamples`) and every
system scored on the same resamples. Promotion compares a candidate with the champion from the same counts
(`compare`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from models.kb_features import candidate_index, candidate_name
from tasks.kg.examples import Doc, load_task_data
from tasks.kg.predict import Outputs, extractor_outputs
from tasks.shared.stats import RESAMPLES, Resamples, interval

COUNTS = [
    "entity_tp",
    "entity_fp",
    "entity_fn",
    "relation_tp",
    "relation_fp",
    "relation_fn",
    "link_right",
    "link_total",
    "link_all_right",
    "link_all_total",
]
"""Per-document counts of one system, from which every metric is computed."""
METRICS = ["entity_f1", "relation_f1", "linking_accuracy", "linking_accuracy_all"]
NO_RELATION = "none"


def span_counts(gold: set[tuple], pred: set[tuple]) -> tuple[int, int, int]:
    """(tp, fp, fn) of exact-match items, e.g. (start, end, label) spans."""
    tp = len(gold & pred)
    return tp, len(pred) - tp, len(gold) - tp


def relation_counts(gold: list[str], pred: list[str]) -> tuple[int, int, int]:
    """(tp, fp, fn) over the non-`none` labels of pairs classified as `pred` with gold labels `gold`."""
    tp = sum(g == p != NO_RELATION for g, p in zip(gold, pred))
    fp = sum(p != NO_RELATION and p != g for g, p in zip(gold, pred))
    fn = sum(g != NO_RELATION and p != g for g, p in zip(gold, pred))
    return tp, fp, fn


@dataclass
class Scored:
    """Per-document counts and the items of the per-label tables."""

    counts: pd.DataFrame
    gold_entities: list[tuple] = field(default_factory=list)
    pred_entities: list[tuple] = field(default_factory=list)
    gold_relations: list[tuple] = field(default_factory=list)
    pred_relations: list[tuple] = field(default_factory=list)


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


def document_counts(extractor, data_dir: Path, doc_ids: set[str], batch_size: int = 32) -> pd.DataFrame:
    """Per-document COUNTS (with `doc_id`, in the task data's doc order) of `extractor` on the docs `doc_ids` of
    the task data in `data_dir`, scored as kg_evaluate scores the candidate (promotion reruns the champion so)."""
    docs = [d for d in load_task_data(data_dir).docs if d.id in doc_ids]
    return score_outputs(extractor_outputs(extractor, docs, batch_size), docs, extractor.entities).counts


def _f1(tp, fp, fn):
    tp, denom = np.asarray(tp, dtype=float), 2 * np.asarray(tp, dtype=float) + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)


def _ratio(right, total):
    right, total = np.asarray(right, dtype=float), np.asarray(total, dtype=float)
    return np.divide(right, total, out=np.zeros_like(total), where=total > 0)


def metrics_of(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of summed COUNTS (..., len(COUNTS)), elementwise over the leading axes."""
    c = {name: sums[..., i] for i, name in enumerate(COUNTS)}
    return {
        "entity_f1": _f1(c["entity_tp"], c["entity_fp"], c["entity_fn"]),
        "relation_f1": _f1(c["relation_tp"], c["relation_fp"], c["relation_fn"]),
        "linking_accuracy": _ratio(c["link_right"], c["link_total"]),
        "linking_accuracy_all": _ratio(c["link_all_right"], c["link_all_total"]),
    }


def _matrix(counts: pd.DataFrame) -> np.ndarray:
    return counts[COUNTS].to_numpy(dtype=np.int64)  # (D, k)


def scores(counts: pd.DataFrame) -> dict[str, float]:
    """Every metric of one system's per-document counts, rounded to 4 places."""
    return {k: round(float(v), 4) for k, v in metrics_of(_matrix(counts).sum(0)).items()}


def resampled(counts: pd.DataFrame, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on each resample of documents `idx` (R, D): arrays (R,)."""
    return metrics_of(_matrix(counts)[idx].sum(1))


def _p_at_most(d: np.ndarray) -> float:
    """Bootstrap one-sided p-value that a difference is not above 0: (1 + #(d <= 0)) / (1 + B)."""
    return round(float((1 + np.sum(d <= 0)) / (1 + len(d))), 6)


def intervals(counts: pd.DataFrame, resamples: Resamples) -> dict[str, list[float]]:
    """The 95% percentile interval of every metric (`<metric>_ci95`)."""
    return {f"{k}_ci95": interval(v) for k, v in resampled(counts, resamples.indices()).items()}


def versus(a: pd.DataFrame, b: pd.DataFrame, resamples: Resamples) -> dict[str, dict]:
    """System `a` against `b` on the same documents: per metric the difference a - b, its 95% interval and the
    one-sided p-value that `a` is not better than `b` (small: a is better)."""
    _same_docs(a, b)
    idx = resamples.indices()
    ra, rb, full_a, full_b = resampled(a, idx), resampled(b, idx), scores(a), scores(b)
    return {
        k: {
            "diff": round(full_a[k] - full_b[k], 4),
            "ci95": interval(ra[k] - rb[k]),
            "p_value": _p_at_most(ra[k] - rb[k]),
        }
        for k in METRICS
    }


def compare(
    candidate_counts: pd.DataFrame, champion_counts: pd.DataFrame, resamples: int = RESAMPLES, seed: int = 1337
) -> dict[str, dict]:
    """A candidate against the champion document by document (both scored on the same test docs, e.g. the rows of
    predictions.parquet): per metric the difference candidate - champion, its 95% interval and the one-sided p-value
    that the candidate is worse (small: significantly worse)."""
    _same_docs(candidate_counts, champion_counts)
    idx = Resamples(len(candidate_counts), resamples, seed).indices()
    rc, rh = resampled(candidate_counts, idx), resampled(champion_counts, idx)
    full_c, full_h = scores(candidate_counts), scores(champion_counts)
    return {
        k: {
            "diff": round(full_c[k] - full_h[k], 4),
            "ci95": interval(rc[k] - rh[k]),
            "p_value": round(float((1 + np.sum(rc[k] - rh[k] >= 0)) / (1 + len(idx))), 6),
        }
        for k in METRICS
    }


def _same_docs(a: pd.DataFrame, b: pd.DataFrame) -> None:
    if len(a) != len(b) or ("doc_id" in a and "doc_id" in b and list(a["doc_id"]) != list(b["doc_id"])):
        raise ValueError(f"paired comparison needs the same documents in the same order ({len(a)} vs {len(b)} rows)")


def system_counts(predictions: pd.DataFrame, system: str) -> pd.DataFrame:
    """One system's counts (`<system>_<count>` columns of predictions.parquet) as plain COUNTS columns."""
    return predictions[["doc_id", *[f"{system}_{c}" for c in COUNTS]]].rename(
        columns={f"{system}_{c}": c for c in COUNTS}
    )


def per_label(gold: list[tuple], pred: list[tuple]) -> dict[str, dict]:
    """Precision, recall, F1 and support per label of exact-match items whose last element is the label
    (spans (doc, start, end, label), or relation pairs (doc, head, tail, label); `none` items are not counted)."""
    gold_by, pred_by = defaultdict(set), defaultdict(set)
    for item in gold:
        gold_by[item[-1]].add(item)
    for item in pred:
        pred_by[item[-1]].add(item)
    table = {}
    for label in sorted((set(gold_by) | set(pred_by)) - {NO_RELATION}):
        tp, fp, fn = span_counts(gold_by[label], pred_by[label])
        table[label] = {
            "precision": round(tp / (tp + fp), 4) if tp + fp else 0.0,
            "recall": round(tp / (tp + fn), 4) if tp + fn else 0.0,
            "f1": round(float(_f1(tp, fp, fn)), 4),
            "support": tp + fn,
        }
    return table
