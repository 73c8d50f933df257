"""kg_data: the knowledge-graph task's data, as flat tables (docs, mentions, relations, entities, facts).

Default (`ingest.spans: stdlib`): distant supervision from the clean corpus' code (tasks/kg/ast_facts.py):
the entity table and facts from the AST, docstrings as the texts, silver mentions that resolve in scope,
and (owner, mention) relation candidates with the AST's gold. Your data (`ingest.spans` -> paths.kg_raw):
your texts, spans and relations, with `none` candidates for the ordered pairs you did not relate.

Splits are held out by file, the same way as classification: a file the clean labeled set already
split keeps its split, the others get `assign_splits` with ingest's seed and fractions (one file of
your data: its rows, by id). The tables pass the Great Expectations checkpoints kg_docs, kg_mentions
and kg_relations (span bounds, label sets, no overlapping spans, relation ends that exist) before
they are written; a failure stops the stage with one line naming the expectation.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.kg.ast_facts import build
from tasks.kg.records import ENTITY_LABELS, NONE, RELATIONS, KgTables, frame, write_tables
from tasks.shared.config.base import Paths
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.config.kg_data import KgDataConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import STDLIB, read_parquet
from tasks.shared.splits import SPLITS, assign_splits, seeded_hash
from tasks.shared.tracking import Tracker
from tasks.shared.validation import describe_failure, open_checkpoints, record

SECTIONS = {"kg_data": KgDataConfig, "ingest": IngestConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`): ingest's seed and fractions split the files."""
CHECKS = ("kg_docs", "kg_mentions", "kg_relations")
"""The Great Expectations checkpoints (gx/) that check the tables."""
VALIDATION = "validation.json"
"""The checkpoints' deterministic result, written beside the tables (tasks/shared/validation.py's format)."""


def split_by_file(docs: pd.DataFrame, known: dict[str, str], ingest: IngestConfig, by_id: bool = False) -> pd.Series:
    """Each doc's split: its file's split in `known`, else `assign_splits` over the other files (by doc
    id when `by_id`: a single file of your data)."""
    key = docs["id"] if by_id else docs["source"]
    unknown = docs[~key.isin(known)]
    groups = (unknown["id"] if by_id else unknown["source"]).value_counts().sort_index()
    table = pd.DataFrame({"group": groups.index, "label": "kg", "n": groups.to_numpy()})
    mapping = {**assign_splits(table, ingest), **known} if len(table) else dict(known)
    return key.map(mapping)


def stdlib_tables(cfg: KgDataConfig, ingest: IngestConfig, paths: Paths) -> tuple[KgTables, list[str]]:
    """The tables from the clean corpus' code rows, split by file; and the files that did not parse."""
    corpus = read_parquet(paths.clean_corpus, columns=["source", "text", "kind"])
    code = corpus[corpus["kind"] == "code"]
    tables, unparsable = build(zip(code["source"], code["text"]), cfg.max_chars)
    labeled = read_parquet(paths.clean_labeled, columns=["source", "split"]).drop_duplicates("source")
    known = dict(zip(labeled["source"], labeled["split"]))
    tables.docs["split"] = split_by_file(tables.docs, known, ingest)
    return tables, unparsable


def _none_pairs(doc_id: str, n: int, related: set[tuple[int, int]], cfg: KgDataConfig) -> list[tuple]:
    pairs = [(h, t) for h in range(n) for t in range(n) if h != t and (h, t) not in related]
    pairs.sort(key=lambda p: seeded_hash(cfg.seed, f"{doc_id}:{p[0]}:{p[1]}"))
    return [(doc_id, h, t, NONE) for h, t in pairs[: cfg.max_none_pairs]]


def user_tables(raw: pd.DataFrame, cfg: KgDataConfig, ingest: IngestConfig) -> KgTables:
    """The tables from your labeled spans (paths.kg_raw); no KB: entities and facts are empty."""
    docs, mentions, relations = [], [], []
    for row in raw.itertuples(index=False):
        docs.append((row.id, row.text, row.source, "", "", ""))
        entities = json.loads(row.entities)
        mentions += [(row.id, m, e["start"], e["end"], e["label"], "") for m, e in enumerate(entities)]
        listed = json.loads(row.relations)
        relations += [(row.id, r["head"], r["tail"], r["label"]) for r in listed]
        relations += _none_pairs(row.id, len(entities), {(r["head"], r["tail"]) for r in listed}, cfg)
    tables = KgTables(
        entities=frame([], "entities"),
        docs=frame(docs, "docs"),
        mentions=frame(mentions, "mentions"),
        relations=frame(sorted(relations), "relations"),
        facts=frame([], "facts"),
    )
    tables.docs["split"] = split_by_file(tables.docs, {}, ingest, by_id=raw["source"].nunique() == 1)
    return tables


def cap_docs(tables: KgTables, cfg: KgDataConfig) -> KgTables:
    """Drop docs without mentions past `max_share_without_mentions`, then keep `max_docs` per split (seeded)."""
    docs = tables.docs.assign(h=[seeded_hash(cfg.seed, i) for i in tables.docs["id"]]).sort_values("h")
    empty = ~docs["id"].isin(tables.mentions["doc_id"])
    if cfg.max_share_without_mentions < 1:
        allowed = math.floor(cfg.max_share_without_mentions / (1 - cfg.max_share_without_mentions) * (~empty).sum())
        docs = pd.concat([docs[~empty], docs[empty].head(allowed)]).sort_values("h")
    if cfg.max_docs:
        docs = docs.groupby("split", sort=True).head(cfg.max_docs)
    keep = set(docs["id"])
    return KgTables(
        entities=tables.entities,
        docs=tables.docs[tables.docs["id"].isin(keep)].reset_index(drop=True),
        mentions=tables.mentions[tables.mentions["doc_id"].isin(keep)].reset_index(drop=True),
        relations=tables.relations[tables.relations["doc_id"].isin(keep)].reset_index(drop=True),
        facts=tables.facts,
    )


def check_frames(tables: KgTables) -> dict[str, pd.DataFrame]:
    """The frame each checkpoint validates (CHECKS), with the computed columns its suite reads."""
    docs, m, r = tables.docs, tables.mentions, tables.relations
    chars = dict(zip(docs["id"], docs["text"].str.len()))
    counts = m.groupby("doc_id").size()
    m = m.sort_values(["doc_id", "start", "end"], kind="stable")
    previous_end = m.groupby("doc_id")["end"].cummax().groupby(m["doc_id"]).shift()
    return {
        "kg_docs": pd.DataFrame(
            {
                "id": docs["id"],
                "split": docs["split"],
                "chars": docs["text"].str.len(),
                "mentions": docs["id"].map(counts).fillna(0).astype("int64"),
            }
        ),
        "kg_mentions": pd.DataFrame(
            {
                "id": m["doc_id"] + "#" + m["m"].astype(str),
                "start": m["start"],
                "end": m["end"],
                "chars": m["doc_id"].map(chars).fillna(0).astype("int64"),
                "label": m["label"],
                "overlaps": (m["start"] < previous_end).to_numpy(dtype=bool),
            }
        ).reset_index(drop=True),
        "kg_relations": pd.DataFrame(
            {
                "id": r["doc_id"] + ":" + r["head"].astype(str) + "->" + r["tail"].astype(str),
                "head": r["head"],
                "tail": r["tail"],
                "mentions": r["doc_id"].map(counts).fillna(0).astype("int64"),
                "label": r["label"],
            }
        ),
    }


def expected_labels(cfg: KgDataConfig, tables: KgTables, stdlib: bool) -> dict:
    """The label sets the suites expect: configured, else the stdlib sets, else your data's train labels."""
    train = set(tables.docs.loc[tables.docs["split"] == "train", "id"])
    entity = cfg.entity_labels or (
        list(ENTITY_LABELS) if stdlib else tables.mentions.loc[tables.mentions["doc_id"].isin(train), "label"]
    )
    relation = cfg.relation_labels or (
        list(RELATIONS) if stdlib else tables.relations.loc[tables.relations["doc_id"].isin(train), "label"]
    )
    return {"entity_labels": sorted(set(entity)), "relation_labels": sorted(set(relation) | {NONE})}


def validate_tables(tables: KgTables, cfg: KgDataConfig, gx: Path, stdlib: bool) -> dict:
    """Run the kg checkpoints on the tables; the deterministic result, or a UserError naming the first failure."""
    frames = check_frames(tables)
    params = {**expected_labels(cfg, tables, stdlib), "min_docs": cfg.min_docs}
    result: dict = {"success": True, "evaluated": 0, "failed": [], "suite_parameters": params, "suites": {}}
    with tempfile.TemporaryDirectory(prefix="lmforge-kg-gx-") as work:
        checkpoints = open_checkpoints(Path(gx), Path(work) / "gx", CHECKS)
        for name in CHECKS:
            run = checkpoints[name].run(batch_parameters={"dataframe": frames[name]}, expectation_parameters=params)
            for res in run.run_results.values():
                result["failed"] += [describe_failure(name, r) for r in res.results if not r.success]
                result["evaluated"] += len(res.results)
                result["success"] &= bool(res.success)
                result["suites"][name] = {"success": bool(res.success), "results": [record(r) for r in res.results]}
    if not result["success"]:
        more = f" (and {len(result['failed']) - 1} more)" if len(result["failed"]) > 1 else ""
        raise UserError(f"kg data validation failed: {result['failed'][0]}{more}")
    return result


def ambiguous(tables: KgTables) -> pd.Series:
    """Per mention: it has a link and at least 2 entities share its surface's last name (a linking choice)."""
    names = tables.entities.groupby("name").size()
    text = dict(zip(tables.docs["id"], tables.docs["text"]))
    m = tables.mentions
    surface = [text[d][s:e].rsplit(".", 1)[-1] for d, s, e in zip(m["doc_id"], m["start"], m["end"])]
    return (m["link"] != "") & (pd.Series(surface, index=m.index).map(names).fillna(0) >= 2)


@dataclass
class KgDataResult:
    tables: KgTables
    unparsable: list[str]
    build_seconds: float
    validated: int

    @property
    def metrics(self) -> dict:
        t = self.tables
        split_of = dict(zip(t.docs["id"], t.docs["split"]))
        m_split, r_split = t.mentions["doc_id"].map(split_of), t.relations["doc_id"].map(split_of)
        amb = ambiguous(t)
        per_split = {
            s: {
                "docs": int((t.docs["split"] == s).sum()),
                "mentions": int((m_split == s).sum()),
                "linkable": int(((t.mentions["link"] != "") & (m_split == s)).sum()),
                "ambiguous": int((amb & (m_split == s)).sum()),
                "relations": int((r_split == s).sum()),
                "relations_not_none": int(((t.relations["label"] != NONE) & (r_split == s)).sum()),
            }
            for s in SPLITS
        }
        return {
            "docs": len(t.docs),
            "docs_without_mentions": int((~t.docs["id"].isin(t.mentions["doc_id"])).sum()),
            "mentions": len(t.mentions),
            "mentions_per_label": {k: int(v) for k, v in t.mentions["label"].value_counts().sort_index().items()},
            "relations": len(t.relations),
            "relations_per_label": {k: int(v) for k, v in t.relations["label"].value_counts().sort_index().items()},
            "entities": len(t.entities),
            "facts": len(t.facts),
            "per_split": per_split,
            "unparsable_files": len(self.unparsable),
            "build_seconds": round(self.build_seconds, 3),
            "expectations": self.validated,
        }


def run(cfg: KgDataConfig, ingest: IngestConfig, paths: Paths, tracker: Tracker | None = None) -> KgDataResult:
    """Build, check and write the task data (paths.kg_data)."""
    start = time.perf_counter()
    stdlib = ingest.spans == STDLIB
    if stdlib:
        tables, unparsable = stdlib_tables(cfg, ingest, paths)
    else:
        tables, unparsable = user_tables(read_parquet(paths.kg_raw), cfg, ingest), []
    if unparsable:
        print(f"kg_data: code files that do not parse, left out: {len(unparsable)} (e.g. {', '.join(unparsable[:3])})")
    tables = cap_docs(tables, cfg)
    build_seconds = time.perf_counter() - start
    result = validate_tables(tables, cfg, paths.gx, stdlib)
    write_tables(tables, paths.kg_data, extra={VALIDATION: result})
    if tracker:
        tracker.log_artifact(Path(paths.kg_data) / VALIDATION, "kg_data")
    return KgDataResult(tables, unparsable, build_seconds, result["evaluated"])


def main() -> None:
    stage_main("kg_data", lambda p, t: run(p.kg_data, p.ingest, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
