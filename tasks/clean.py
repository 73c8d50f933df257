"""clean: Unicode normalization, control-character and whitespace cleanup, length filter, exact dedup.

Indentation is preserved (the corpus is mostly code). Every filter's removals are counted.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

import pandas as pd

from tasks.shared.config.base import Paths
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import read_parquet, write_parquet
from tasks.shared.tracking import Tracker

SECTIONS = {"clean": CleanConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""

_BLANK_RUNS = re.compile(r"\n{3,}")
_DROP_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Normalize one text: Unicode form, newlines, tabs, control/format characters, blank lines."""
    text = unicodedata.normalize(cfg.unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(cfg.tab_size)
    if not text.isascii():
        text = "".join(c for c in text if c == "\n" or unicodedata.category(c) not in _DROP_CATEGORIES)
    else:
        text = "".join(c for c in text if c == "\n" or c >= " " and c != "\x7f")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def clean_frame(df: pd.DataFrame, cfg: CleanConfig, max_chars: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean `df.text`; returns the kept rows and how many rows each filter removed."""
    counts = {"input": len(df)}
    cleaned = df["text"].map(lambda t: clean_text(t, cfg))
    counts["modified"] = int((cleaned != df["text"]).sum())
    df = df.assign(text=cleaned)
    n = df["text"].str.len()
    counts["too_short"] = int((n < cfg.min_chars).sum())
    counts["too_long"] = int((n > max_chars).sum())
    df = df[(n >= cfg.min_chars) & (n <= max_chars)]
    digest = df["text"].map(lambda t: hashlib.sha1(t.encode()).hexdigest())
    dup = digest.duplicated(keep="first")
    counts["duplicates"] = int(dup.sum())
    df = df[~dup].reset_index(drop=True)
    counts["output"] = len(df)
    return df, counts


@dataclass
class CleanResult:
    corpus: dict[str, int]
    labeled: dict[str, int]

    @property
    def metrics(self) -> dict:
        return {"corpus": self.corpus, "labeled": self.labeled}


def run(cfg: CleanConfig, paths: Paths, tracker: Tracker | None = None) -> CleanResult:
    corpus, c_counts = clean_frame(read_parquet(paths.raw_corpus, ["text", "source"]), cfg, cfg.max_chars)
    # order train first so that a text duplicated across splits keeps its training copy
    labeled = read_parquet(paths.raw_labeled, ["text", "label", "source", "split"])
    order = labeled["split"].map({"train": 0, "val": 1, "test": 2})
    labeled = labeled.iloc[order.argsort(kind="stable")]
    labeled, l_counts = clean_frame(labeled, cfg, cfg.labeled_max_chars)
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
