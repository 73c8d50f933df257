"""align_data: the alignment task's pairs (text, code) and the items its index holds, from `paths.raw_pairs`.

Default (`ingest.pairs: stdlib`): every function of the stdlib files ingest read, its docstring as the text
and its code without the docstring, held out by file with the classification split (ingest assigned it).
Your data: your pairs (split by source in ingest) and your documents (split `index`: indexed, never trained
or evaluated on).

- `pairs.parquet`: the rows with a text and code, split train/val/test; `query` = the text's first sentence
  or the whole text (`align_data.query`) — what evaluation searches with.
- `items.parquet`: every row with code (with or without text, your documents too): what the index holds.
  The test pool is the items with split `test`; a test pair's gold item has the same `id`.

Duplicates (code equal once whitespace is collapsed): a row whose code also lies in val or test is dropped
from train (it would leak the held-out answer into training); of identical code within one split only the
first row is kept (a row with a text first, then by source and line), so no pool holds two copies of a
gold item and no batch holds a pair's twin as a negative. Both are counted in the metrics.

The pairs pass the Great Expectations checkpoint `align_pairs` (gx/: non-empty text, query and code, the
split set, unique ids) before anything is written; a failure stops the stage with one line naming the
expectation. Its deterministic result is written beside the tables (validation.json).
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.align.records import (
    INDEX_SPLIT,
    ITEM_COLUMNS,
    ITEMS_FILE,
    PAIR_COLUMNS,
    PAIR_DATA_COLUMNS,
    PAIRS_FILE,
    SNIPPET_CHARS,
)
from tasks.shared.config.align_data import AlignDataConfig
from tasks.shared.config.base import Paths
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet, write_json
from tasks.shared.splits import SPLITS
from tasks.shared.tracking import Tracker
from tasks.shared.validation import describe_failure, open_checkpoints, record

SECTIONS = {"align_data": AlignDataConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
CHECKS = ("align_pairs",)
"""The Great Expectations checkpoints (gx/) that check the pairs."""
VALIDATION = "validation.json"
"""The checkpoints' deterministic result, written beside the tables (tasks/shared/validation.py's format)."""
HELD_OUT = ("val", "test")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_ABBREVIATIONS = ("e.g", "i.e", "etc", "cf", "vs")
"""Words whose period ends no sentence (`Return a mapping, e.g. {...}`)."""


def first_sentence(text: str) -> str:
    """The first sentence of the first paragraph, whitespace collapsed (the whole paragraph if no sentence
    ends in it)."""
    paragraph = " ".join(_PARAGRAPH.split(text.strip(), maxsplit=1)[0].split())
    for end in _SENTENCE_END.finditer(paragraph):
        word = paragraph[: end.start()].rsplit(" ", 1)[-1].lower()
        if not word.endswith(_ABBREVIATIONS):
            return paragraph[: end.end()]
    return paragraph


def make_query(text: str, mode: str) -> str:
    """The query of a pair: its first sentence or its whole text (whitespace collapsed)."""
    return first_sentence(text) if mode == "first_sentence" else " ".join(text.split())


def normalise(code: str) -> str:
    """Code with whitespace collapsed: what two rows must share to be duplicates."""
    return " ".join(code.split())


def snippet(code: str) -> str:
    """The first non-empty line of `code` (a function's signature, its decorator if any), cut to SNIPPET_CHARS."""
    first = next((line.strip() for line in code.splitlines() if line.strip()), "")
    return first[:SNIPPET_CHARS]


@dataclass
class Counts:
    """What align_data left out or changed, by reason."""

    rows: int = 0
    short_code: int = 0
    texts_cut: int = 0
    codes_cut: int = 0
    duplicates_dropped_from_train: int = 0
    """Train pairs whose code is also in val or test (dropped)."""
    duplicates_within_split: dict[str, int] = field(default_factory=dict)
    """Pairs whose code is already in their own split (all but the first dropped)."""
    items_duplicates_dropped: int = 0
    """Items (with or without text) dropped by the two rules above."""


def _cut(column: pd.Series, limit: int) -> tuple[pd.Series, int]:
    if not limit:
        return column, 0
    long = column.str.len() > limit
    return column.where(~long, column.str.slice(0, limit)), int(long.sum())


def prepare(raw: pd.DataFrame, cfg: AlignDataConfig, counts: Counts) -> pd.DataFrame:
    """Rows with code of at least `min_code_chars`, texts and code cut to their limits, and a `query`."""
    counts.rows = len(raw)
    rows = raw.assign(code=raw["code"].fillna(""), text=raw["text"].fillna(""))
    short = rows["code"].str.strip().str.len() < cfg.min_code_chars
    counts.short_code = int(short.sum())
    rows = rows[~short].copy()
    rows["text"], counts.texts_cut = _cut(rows["text"], cfg.max_text_chars)
    rows["code"], counts.codes_cut = _cut(rows["code"], cfg.max_code_chars)
    query = [make_query(t, cfg.query) if t.strip() else "" for t in rows["text"]]
    rows["query"] = _cut(pd.Series(query, index=rows.index, dtype=object), cfg.max_text_chars)[0]
    return rows


def deduplicate(rows: pd.DataFrame, counts: Counts) -> pd.DataFrame:
    """Drop train rows whose code is in val or test, and all but the first of identical code within a split."""
    has_text = rows["query"] != ""
    order = rows.assign(norm=rows["code"].map(normalise), blank=~has_text)
    order = order.sort_values(["blank", "source", "line", "id"], kind="stable")
    held = set(order.loc[order["split"].isin(HELD_OUT), "norm"])
    leak = (order["split"] == "train") & order["norm"].isin(held)
    twin = order.duplicated(["split", "norm"]) & ~leak
    counts.duplicates_dropped_from_train = int((leak & ~order["blank"]).sum())
    counts.duplicates_within_split = {
        s: int((twin & ~order["blank"] & (order["split"] == s)).sum()) for s in (*SPLITS, INDEX_SPLIT)
    }
    counts.items_duplicates_dropped = int((leak | twin).sum())
    return rows.loc[order.index[~(leak | twin)]].sort_values(["split", "source", "line", "id"], kind="stable")


def split_tables(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs, items) of the deduplicated rows."""
    pairs = rows[(rows["query"] != "") & rows["split"].isin(SPLITS)]
    items = rows.assign(snippet=rows["code"].map(snippet))
    return pairs[PAIR_DATA_COLUMNS].reset_index(drop=True), items[ITEM_COLUMNS].reset_index(drop=True)


def check_splits(pairs: pd.DataFrame, source: Path) -> None:
    """Every split has pairs: training needs train, model selection val, evaluation test."""
    empty = [s for s in SPLITS if not (pairs["split"] == s).any()]
    if empty:
        splits = " and ".join(empty) + (" splits have" if len(empty) > 1 else " split has")
        raise UserError(
            f"{source}: the {splits} no pairs (pairs are split by whole source in ingest: add pairs or distinct "
            "sources; stdlib pairs are held out by the stdlib labeled set's split, so they need `ingest.labeled: "
            "stdlib`)"
        )


def check_frame(pairs: pd.DataFrame) -> pd.DataFrame:
    """The frame the `align_pairs` checkpoint validates: ids, splits and the length of each side."""
    return pd.DataFrame(
        {
            "id": pairs["id"],
            "split": pairs["split"],
            "text_chars": pairs["text"].str.strip().str.len(),
            "query_chars": pairs["query"].str.strip().str.len(),
            "code_chars": pairs["code"].str.strip().str.len(),
        }
    )


def validate_pairs(pairs: pd.DataFrame, cfg: AlignDataConfig, gx: Path) -> dict:
    """Run the align checkpoints on the pairs; the deterministic result, or a UserError naming the first failure."""
    params = {"min_code_chars": cfg.min_code_chars}
    result: dict = {"success": True, "evaluated": 0, "failed": [], "suite_parameters": params, "suites": {}}
    with tempfile.TemporaryDirectory(prefix="lmforge-align-gx-") as work:
        checkpoints = open_checkpoints(Path(gx), Path(work) / "gx", CHECKS)
        for name in CHECKS:
            run = checkpoints[name].run(
                batch_parameters={"dataframe": check_frame(pairs)}, expectation_parameters=params
            )
            for res in run.run_results.values():
                result["failed"] += [describe_failure(name, r) for r in res.results if not r.success]
                result["evaluated"] += len(res.results)
                result["success"] &= bool(res.success)
                result["suites"][name] = {"success": bool(res.success), "results": [record(r) for r in res.results]}
    if not result["success"]:
        more = f" (and {len(result['failed']) - 1} more)" if len(result["failed"]) > 1 else ""
        raise UserError(f"align data validation failed: {result['failed'][0]}{more}")
    return result


def write_align_data(folder: Path | str, pairs: pd.DataFrame, items: pd.DataFrame, validation: dict) -> None:
    """pairs.parquet, items.parquet and validation.json, replacing `folder` at once."""
    with atomic_dir(folder) as tmp:
        pairs.astype(str).to_parquet(tmp / PAIRS_FILE, index=False)
        items.astype({c: "int64" if c == "line" else str for c in ITEM_COLUMNS}).to_parquet(
            tmp / ITEMS_FILE, index=False
        )
        write_json(tmp / VALIDATION, validation)


@dataclass
class AlignDataResult:
    pairs: pd.DataFrame
    items: pd.DataFrame
    counts: Counts
    validated: int
    build_seconds: float

    @property
    def metrics(self) -> dict:
        c = self.counts
        return {
            "pairs": len(self.pairs),
            "pairs_per_split": {s: int((self.pairs["split"] == s).sum()) for s in SPLITS},
            "items": len(self.items),
            "items_per_split": {k: int(v) for k, v in self.items["split"].value_counts().sort_index().items()},
            "raw_rows": c.rows,
            "short_code_dropped": c.short_code,
            "texts_cut": c.texts_cut,
            "codes_cut": c.codes_cut,
            "duplicates_dropped_from_train": c.duplicates_dropped_from_train,
            "duplicates_within_split": c.duplicates_within_split,
            "items_duplicates_dropped": c.items_duplicates_dropped,
            "validation_passed": True,
            "expectations": self.validated,
            "build_seconds": round(self.build_seconds, 3),
        }


def run(cfg: AlignDataConfig, paths: Paths, tracker: Tracker | None = None) -> AlignDataResult:
    """Build, check and write the task data (paths.align_data)."""
    start = time.perf_counter()
    counts = Counts()
    raw = read_parquet(paths.raw_pairs, PAIR_COLUMNS)
    pairs, items = split_tables(deduplicate(prepare(raw, cfg, counts), counts))
    check_splits(pairs, Path(paths.raw_pairs))
    build_seconds = time.perf_counter() - start
    validation = validate_pairs(pairs, cfg, paths.gx)
    write_align_data(paths.align_data, pairs, items, validation)
    if tracker:
        tracker.log_artifact(Path(paths.align_data) / VALIDATION, "align_data")
    return AlignDataResult(pairs, items, counts, validation["evaluated"], build_seconds)


def main() -> None:
    stage_main("align_data", lambda p, t: run(p.align_data, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
