"""clean: Unicode normalization, control-character and whitespace cleanup, length filter, exact dedup.

Indentation is preserved (the corpus is mostly code). Every filter's removals are counted and printed as
one line with an example; among labeled duplicates, those with another label or split are counted apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pandas as pd

from tasks.shared.config.base import Paths
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import read_parquet, write_parquet
from tasks.shared.text import normalize_text
from tasks.shared.tracking import Tracker

SECTIONS = {"clean": CleanConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""

def clean_text(text: str, cfg: CleanConfig) -> str:
    """Normalize one text: Unicode form, newlines, tabs, control/format characters, blank lines (the servers
    apply the same function to requests, with the values recorded in the registered model)."""
    return normalize_text(text, cfg.unicode_form, cfg.tab_size)


def _where(row: pd.Series) -> str:
    return f" ({row['source']})" if "source" in row.index else ""


def _snippet(row: pd.Series) -> str:
    return f"{row['text'][:30]!r}{_where(row)}"


def clean_frame(df: pd.DataFrame, cfg: CleanConfig, max_chars: int) -> tuple[pd.DataFrame, dict[str, int], dict[str, str]]:
    """Clean `df.text`; returns the kept rows, how many rows each filter removed, and an example of each.

    A duplicate keeps its first copy. With a `label` / `split` column, `label_conflicts` /
    `cross_split_duplicates` count the removed duplicates whose label / split differs from the kept copy's.
    """
    counts, examples = {"input": len(df)}, {}
    cleaned = df["text"].map(lambda t: clean_text(t, cfg))
    counts["modified"] = int((cleaned != df["text"]).sum())
    df = df.assign(text=cleaned)
    n = df["text"].str.len()
    for key, bad in (("too_short", n < cfg.min_chars), ("too_long", n > max_chars)):
        counts[key] = int(bad.sum())
        if counts[key]:
            examples[key] = _snippet(df[bad].iloc[0])
    df = df[(n >= cfg.min_chars) & (n <= max_chars)]
    digest = df["text"].map(lambda t: hashlib.sha1(t.encode()).hexdigest())
    dup = digest.duplicated(keep="first")
    counts["duplicates"] = int(dup.sum())
    if counts["duplicates"]:
        examples["duplicates"] = _snippet(df[dup].iloc[0])
    kept = df[~dup].set_index(digest[~dup])
    for column, key in (("label", "label_conflicts"), ("split", "cross_split_duplicates")):
        if column in df.columns:
            first = digest.map(kept[column])
            differs = dup & (df[column] != first)
            counts[key] = int(differs.sum())
            if counts[key]:
                row = df[differs].iloc[0]
                other = kept.loc[digest[differs].iloc[0]]
                examples[key] = f"{_snippet(row)} is {row[column]!r}, the kept copy{_where(other)} is {other[column]!r}"
    df = df[~dup].reset_index(drop=True)
    counts["output"] = len(df)
    return df, counts, examples


def report(name: str, counts: dict[str, int], examples: dict[str, str]) -> None:
    """One stdout line: how many rows of `name` were dropped, by which filter, with an example each."""
    if counts["output"] < counts["input"]:
        parts = "; ".join(f"{counts[k]} {k} (e.g. {e})" for k, e in examples.items())
        print(f"clean: {name}: dropped {counts['input'] - counts['output']} of {counts['input']} rows: {parts}", flush=True)


@dataclass
class CleanResult:
    corpus: dict[str, int]
    labeled: dict[str, int]

    @property
    def metrics(self) -> dict:
        return {"corpus": self.corpus, "labeled": self.labeled}


def run(cfg: CleanConfig, paths: Paths, tracker: Tracker | None = None) -> CleanResult:
    corpus, c_counts, c_examples = clean_frame(read_parquet(paths.raw_corpus, ["text", "source"]), cfg, cfg.max_chars)
    # order train first so that a text duplicated across splits (or labels) keeps its training copy
    labeled = read_parquet(paths.raw_labeled, ["text", "label", "source", "split"])
    order = labeled["split"].map({"train": 0, "val": 1, "test": 2})
    labeled = labeled.iloc[order.argsort(kind="stable")]
    labeled, l_counts, l_examples = clean_frame(labeled, cfg, cfg.labeled_max_chars)
    report("corpus", c_counts, c_examples)
    report("labeled", l_counts, l_examples)
    for name, df in (("corpus", corpus), ("labeled", labeled)):
        if df.empty:
            raise UserError(f"params.yaml: clean: every {name} row was filtered out (check min_chars/max_chars)")
    write_parquet(corpus, paths.clean_corpus)
    write_parquet(labeled, paths.clean_labeled)
    return CleanResult(corpus=c_counts, labeled=l_counts)


def main() -> None:
    stage_main("clean", lambda p, t: run(p.clean, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
