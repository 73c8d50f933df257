"""ingest + align_data on the tiny project's stdlib slice (TINY_PROJECT's ingest section): every function of the
files ingest reads becomes a raw pair with its file's split, and align_data writes checked pairs and items."""

from __future__ import annotations

import ast
import json
import tokenize

import pandas as pd
import pytest
from conftest import TINY_PROJECT

from tasks import ingest
from tasks.align import data
from tasks.align.records import read_items, read_pairs
from tasks.shared.config.align_data import AlignDataConfig
from tasks.shared.config.ingest import IngestConfig

pytestmark = pytest.mark.integration


def test_ingest_and_align_data_on_the_stdlib_slice(tiny_project):
    paths = tiny_project
    result = ingest.run(IngestConfig(**TINY_PROJECT["ingest"]), paths)
    raw = pd.read_parquet(paths.raw_pairs)
    labeled = pd.read_parquet(paths.raw_labeled)
    corpus = pd.read_parquet(paths.raw_corpus)
    read = set(labeled["source"]) | set(corpus["source"])
    assert set(raw["source"]) <= read
    root = ingest.stdlib_root()
    for source in sorted(read)[::5]:  # every function of the files ingest read, nested ones too
        with tokenize.open(root / source) as f:
            tree = ast.parse(f.read())
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        assert sorted(raw.loc[raw["source"] == source, "line"]) == sorted(n.lineno for n in defs), source
    split_of = dict(zip(labeled["source"], labeled["split"]))
    assert (raw["split"] == raw["source"].map(split_of).fillna("train")).all()
    assert sum(result.pair_rows.values()) == len(raw)

    out = data.run(AlignDataConfig(), paths)
    pairs, items = read_pairs(paths.align_data), read_items(paths.align_data)
    metrics = out.metrics
    assert metrics["pairs"] == len(pairs) and metrics["items"] == len(items)
    assert all(metrics["pairs_per_split"][s] > 0 for s in ("train", "val", "test"))
    assert (pairs["text"].str.strip() != "").all() and (pairs["query"].str.strip() != "").all()
    assert set(pairs["id"]) <= set(items["id"]) and items["id"].is_unique
    test_items = set(items.loc[items["split"] == "test", "id"])
    assert set(pairs.loc[pairs["split"] == "test", "id"]) <= test_items  # each test query's gold is in the pool
    codes = pairs.groupby("split")["code"].agg(lambda c: set(c.map(data.normalise)))
    assert not codes["train"] & (codes["val"] | codes["test"])
    assert json.loads((paths.align_data / data.VALIDATION).read_text())["success"] is True
