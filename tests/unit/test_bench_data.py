"""bench/data_throughput.py: the generated corpus holds what it says it planted, the scores count right on a
hand-made output, and one end-to-end run at a tiny size prints its table and a sane JSON last line
(no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("data_throughput", ROOT / "bench" / "data_throughput.py")
dt = importlib.util.module_from_spec(spec)
sys.modules["data_throughput"] = dt  # its dataclasses look their module up
spec.loader.exec_module(dt)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.parquet"
    planted = dt.generate_corpus(path, 1.5, seed=7, row_group_mb=0.5)
    return path, planted, pd.read_parquet(path).set_index("id", drop=False)


def test_corpus_layout_and_sizes(corpus):
    path, planted, df = corpus
    f = pq.ParquetFile(path)
    assert f.schema_arrow.names == ["id", "text", "source", "kind"]
    assert f.num_row_groups == 3  # one per row_group_mb: never more than that in memory
    assert list(df["id"]) == list(range(planted["docs"]))
    assert planted["text_bytes"] == df["text"].str.encode("utf-8").str.len().sum() >= 1.5 * dt.MB
    n = df["text"].str.len()
    assert n.min() > 300 and n.max() < 9000 and 1500 < n.mean() < 4000
    assert set(df["kind"]) == {"code", "text"} and 0.25 < (df["kind"] == "code").mean() < 0.55
    assert df["source"].is_unique
    assert (
        ~df["text"].map(str.isascii)
    ).mean() > 0.2  # prose carries accented words, so normalization is not all ASCII fast path


def test_planted_duplicates_and_pii_are_where_recorded(corpus):
    _, planted, df = corpus
    docs = planted["docs"]
    for name in ("exact", "near", "pii"):
        assert 0.02 * docs < len({p[1] if name != "pii" else p[0] for p in planted[name]}) < 0.08 * docs, name
    for src, copy in planted["exact"]:
        assert src < copy and df.at[src, "text"] == df.at[copy, "text"]
    for src, copy, j in planted["near"]:
        a, b = df.at[src, "text"], df.at[copy, "text"]
        assert src < copy and a != b
        assert dt.jaccard(a, b) == pytest.approx(j, abs=1e-4) and j >= dt.NEAR_MIN_JACCARD
    members = [i for name in ("exact", "near") for p in planted[name] for i in p[:2]]
    assert len(members) == len(set(members))  # each source copied once, never a copy of a copy
    assert {k for _, k, _ in planted["pii"]} == set(dt.PII_KINDS)
    for doc, kind, value in planted["pii"]:
        assert value in df.at[doc, "text"], (kind, value)
    assert not set(members) & {p[0] for p in planted["pii"]}


def test_generation_is_deterministic(tmp_path, corpus):
    path, planted, df = corpus
    again = dt.generate_corpus(tmp_path / "again.parquet", 1.5, seed=7, row_group_mb=0.5)
    assert again == planted
    assert pd.read_parquet(tmp_path / "again.parquet")["text"].tolist() == df["text"].tolist()
    other = dt.generate_corpus(tmp_path / "other.parquet", 1.5, seed=8, row_group_mb=0.5)
    assert other["pii"] != planted["pii"]


def test_scores_on_a_hand_made_output(tmp_path, corpus):
    _, planted, df = corpus
    out = df.copy()
    copies = [c for _, c in planted["exact"]]
    out = out.drop(index=copies)
    near = planted["near"]
    out = out.drop(index=[c for _, c, _ in near[:-2]] + [near[-1][0], near[-1][1]])  # the last pair: both gone
    pii_doc = planted["pii"][0][0]
    for doc, _, value in planted["pii"][1:]:
        out.loc[doc, "text"] = out.loc[doc, "text"].replace(value, "<SECRET>")
    planted_ids = {x for p in planted["exact"] + near for x in p[:2]} | {p[0] for p in planted["pii"]}
    unplanted = [i for i in df.index if i not in planted_ids]
    out = out.drop(index=[unplanted[0]])
    out.loc[unplanted[1], "text"] += " at <IP> now"  # scrubbed where nothing was planted
    out.to_parquet(tmp_path / "out.parquet", index=False)
    kept_before = np.ones(planted["docs"], bool)
    s, kept = dt.score(tmp_path / "out.parquet", planted, planted["docs"], kept_before)
    assert kept.sum() == len(out) == s["docs_out"]
    assert s["exact_one_survives"] == 1.0
    assert s["near_one_survives"] == pytest.approx(round((len(near) - 2) / len(near), 4))
    assert (s["near_both_kept"], s["near_both_removed"]) == (1, 1)
    assert s["near_false_positives"] == s["unplanted_removed"] == 1
    n_first = sum(1 for d, _, _ in planted["pii"] if d == pii_doc)
    assert s["pii_values_checked"] == len(planted["pii"])
    assert s["pii_recall"] == pytest.approx(round(1 - n_first / len(planted["pii"]), 4))
    assert s["pii_false_positive_docs"] == 1


def test_labeled_set_has_the_contract_shape():
    labels = ["asyncio", "email", "http", "json", "xml"]
    df = dt.generate_labeled(2000, labels, seed=3)
    assert list(df.columns) == ["id", "text", "label", "source", "split"] and len(df) == 2000
    assert (
        df["id"].is_unique
        and df["text"].is_unique
        and df["text"].str.len().min() >= 40
        and df["text"].str.len().max() <= 6000
    )
    assert (df.groupby("source")["split"].nunique() == 1).all()
    counts = df.groupby(["label", "split"]).size()
    assert len(counts) == 3 * len(labels) and counts.min() >= 10


@pytest.mark.slow
def test_end_to_end_at_a_tiny_size(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "data_throughput.py"),
        "--sizes",
        "0.5,1",
        "--validate-rows",
        "2000",
        "--row-group-mb",
        "0.25",
        "--workdir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert lines[0].split()[:3] == ["size", "MB", "docs"] and any(line.startswith("target") for line in lines)
    for key in (
        "clean_mb_per_s",
        "dedup_mb_per_s",
        "peak_rss_mb",
        "clean_mb_per_s_per_core",
        "dedup_mb_per_s_per_core",
    ):
        assert set(r[key]) == {"0.5", "1"} and all(v > 0 for v in r[key].values()), key
    for key in ("near_dup_recall", "pii_recall", "exact_dup_removal"):
        assert 0 <= r[key] <= 1, key
    assert r["validate_rows_per_s"] > 0 and r["validate"]["rows"] == 2000
    assert set(r["targets"]) == {
        "clean_mb_per_s_per_core",
        "dedup_mb_per_s_per_core",
        "peak_rss_ratio",
        "near_dup_recall",
        "pii_recall",
    }
    assert all(isinstance(t["met"], bool) for t in r["targets"].values())
    assert r["machine"]["cores"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".parquet") == [
        "corpus-0.5mb-seed1337-rg0.25.parquet",
        "corpus-1mb-seed1337-rg0.25.parquet",
    ]
