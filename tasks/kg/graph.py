"""kg_graph: the knowledge graph, as an embedded pyoxigraph store and an N-Triples export.

Entities and facts come from the AST (the task data's `entities` and `facts` tables); the extractor reads every
doc of every split and adds the mentions it finds (linked to entities) and the relations it predicts, each with
its confidence and the model version (tasks/kg/rdf.py is the vocabulary, docs/kg.md shows queries). The store is
built in a temporary folder and renamed into `paths.kg_graph/store`, beside `graph.nt`, which any SPARQL server
loads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
from pyoxigraph import DefaultGraph, Quad, RdfFormat, Store

from tasks.kg.examples import read_task_table
from tasks.kg.rdf import (
    GRAPH_FILE,
    STORE_DIR,
    doc_quads,
    entity_quads,
    extracted_quads,
    fact_quads,
    kept_mentions,
    kept_relations,
)
from tasks.shared.config.base import Paths
from tasks.shared.config.kg_graph import KgGraphConfig
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, write_json
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"kg_graph": KgGraphConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
GRAPH_METRICS = "kg.json"
"""In `paths.metrics`: entities, relations, mentions, triples, build_seconds, docs_per_second."""
CHUNK_DOCS = 256
"""Docs per extract call: the progress bar moves once per chunk."""


@dataclass
class GraphResult:
    entities: int
    relations: int
    """Stated relations: the AST's facts plus the extracted ones kept."""
    relations_ast: int
    relations_model: int
    mentions: int
    triples: int
    docs: int
    extract_seconds: float
    """The extractor reading every doc."""
    store_seconds: float
    """Writing the store and the N-Triples export."""
    build_seconds: float
    """The whole build: reading the tables, extracting, writing the store and the export."""
    docs_per_second: float
    model_version: str

    @property
    def metrics(self) -> dict:
        return asdict(self)


def load_extractor(folder: Path):
    """The extractor bundle at `folder` (models/extractor.py; torch is imported there, so only when needed)."""
    from models.extractor import load_extractor as load

    return load(folder)


def extract_all(extractor, docs: pd.DataFrame, batch_size: int) -> list[dict]:
    """The extractor's output for every doc, in order, with a progress bar over the docs."""
    from tqdm import tqdm

    texts = docs["text"].tolist()
    subjects = [o or None for o in docs["owner"].tolist()]
    out: list[dict] = []
    with tqdm(total=len(texts), desc="kg_graph extract", unit="doc", dynamic_ncols=True) as bar:
        for i in range(0, len(texts), CHUNK_DOCS):
            out.extend(extractor.extract(texts[i : i + CHUNK_DOCS], subjects[i : i + CHUNK_DOCS], batch_size))
            bar.update(len(texts[i : i + CHUNK_DOCS]))
    return out


@dataclass
class _Counts:
    relations_model: int = 0
    mentions: int = 0


def _extracted(docs: list[dict], extractions: list[dict], version: str, cfg: KgGraphConfig, n: _Counts):
    """Every doc's extracted quads, counting the mentions and relation statements kept."""
    for doc, extraction in zip(docs, extractions):
        n.mentions += len(kept_mentions(extraction, cfg.min_confidence))
        n.relations_model += len(kept_relations(doc, extraction, cfg.min_confidence))
        yield from extracted_quads(doc, extraction, version, cfg.min_confidence)


def all_quads(tables: dict[str, pd.DataFrame], extractions: list[dict], version: str, cfg, n: _Counts) -> Iterator:
    """The whole graph: entities, docs, AST facts, then what the extractor found."""
    yield from entity_quads(_records(tables["entities"]))
    yield from doc_quads(_records(tables["docs"]))
    yield from fact_quads(_records(tables["facts"]))
    yield from _extracted(_records(tables["docs"]), extractions, version, cfg, n)


def _records(df: pd.DataFrame) -> list[dict]:
    return df.to_dict("records")


def write_graph(folder: Path, quads: Iterable[Quad]) -> int:
    """Fill a new store in `folder/store` with `quads`, export it to `folder/graph.nt`; returns the triple count."""
    store = Store(str(folder / STORE_DIR))
    store.bulk_extend(quads)
    store.flush()
    store.dump(folder / GRAPH_FILE, RdfFormat.N_TRIPLES, from_graph=DefaultGraph())
    triples = len(store)
    del store  # closes the RocksDB files before the folder is renamed into place
    return triples


def run(cfg: KgGraphConfig, paths: Paths, tracker: Tracker | None = None, extractor=None) -> GraphResult:
    """Build the graph from `paths.kg_data` and the extractor (default: the bundle at `paths.kg_model`)."""
    tracker = tracker or NullTracker()
    start = time.perf_counter()
    tables = {name: read_task_table(paths.kg_data, name) for name in ("entities", "docs", "facts")}
    extractor = extractor if extractor is not None else load_extractor(paths.kg_model)
    t = time.perf_counter()
    extractions = extract_all(extractor, tables["docs"], cfg.batch_size)
    extract_seconds = time.perf_counter() - t
    counts, t = _Counts(), time.perf_counter()
    with atomic_dir(paths.kg_graph) as d:
        triples = write_graph(d, all_quads(tables, extractions, extractor.version, cfg, counts))
    store_seconds, build_seconds = time.perf_counter() - t, time.perf_counter() - start
    n_docs, n_facts = len(tables["docs"]), len(tables["facts"])
    print(
        f"kg_graph: {triples:,} triples ({len(tables['entities']):,} entities, {n_facts:,} AST relations, "
        f"{counts.relations_model:,} extracted relations, {counts.mentions:,} mentions) from {n_docs:,} docs "
        f"in {build_seconds:.1f} s (extraction {extract_seconds:.1f} s)"
    )
    tracker.log_params({"kg_graph.model_version": extractor.version})
    return GraphResult(
        entities=len(tables["entities"]),
        relations=n_facts + counts.relations_model,
        relations_ast=n_facts,
        relations_model=counts.relations_model,
        mentions=counts.mentions,
        triples=triples,
        docs=n_docs,
        extract_seconds=round(extract_seconds, 3),
        store_seconds=round(store_seconds, 3),
        build_seconds=round(build_seconds, 3),
        docs_per_second=round(n_docs / build_seconds, 1) if build_seconds > 0 else 0.0,
        model_version=extractor.version,
    )


def _run(params, tracker: Tracker) -> dict:
    metrics = run(params.kg_graph, params.paths, tracker).metrics
    # the graph's own figures under the name the issue gives them; metrics/kg_graph.json adds the stage's cost
    write_json(params.paths.metrics / GRAPH_METRICS, metrics)
    return metrics


def main() -> None:
    stage_main("kg_graph", _run, SECTIONS)


if __name__ == "__main__":
    main()
