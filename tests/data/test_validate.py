"""Data contracts: the Great Expectations checkpoints of gx/ pass on good data and name what breaks on bad data."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import LABELS, ROOT, TINY_CLEAN, TINY_VALIDATE

from tasks import validate
from tasks.align import data as align_data
from tasks.kg import data as kg_data
from tasks.shared.errors import UserError
from tasks.shared.validation import require_passed


@pytest.fixture
def clean_data(tiny_clean):
    """The tiny cleaned data with the `id` column of the clean contract (added here while clean does not write it)."""
    for path in (tiny_clean.clean_corpus, tiny_clean.clean_labeled):
        df = pd.read_parquet(path)
        if "id" not in df.columns:
            df.insert(0, "id", df["source"] + "#" + df.groupby("source").cumcount().astype(str))
            df.to_parquet(path, index=False)
    return tiny_clean


def _run(paths, packages=LABELS, stdlib=True, **cfg):
    return validate.run(TINY_VALIDATE.model_copy(update=cfg), TINY_CLEAN, packages, stdlib, paths)


def _results(paths) -> dict:
    return json.loads(paths.validation.read_text())


def _edit(path, edit) -> None:
    df = pd.read_parquet(path)
    df = edit(df)
    df.to_parquet(path, index=False)


def _rows(df, split):
    return df.index[df["split"] == split]


def _fails_with(paths, expectation: str, row_id: str | None, **kw) -> str:
    """Run validate expecting a failure: the one-line message names the expectation (as `<table>: <type>(`)
    and, for a row-level expectation, the id of an offending row; the result file records the failure."""
    with pytest.raises(UserError) as err:
        _run(paths, **kw)
    msg = str(err.value)
    assert msg.startswith("data validation failed") and "\n" not in msg
    assert f"{paths.data_docs / 'index.html'}" in msg
    res = _results(paths)
    assert res["success"] is False
    failure = next((f for f in res["failed"] if expectation in f), None)
    assert failure and failure in msg, msg
    if row_id is not None:
        assert re.search(rf"(e\.g\. |, ){re.escape(str(row_id))}(=|,|$)", failure), (row_id, failure)
    with pytest.raises(UserError, match="data validation failed"):
        require_passed(paths.validation)
    assert (paths.data_docs / "index.html").is_file()  # the Data Docs show the failure too
    return failure


def test_good_data_passes_and_writes_results_and_docs(clean_data):
    res = _run(clean_data)
    assert res.success and res.failed == []
    assert set(res.per_suite) == set(validate.TABLES)
    assert res.evaluated == sum(s["evaluated"] for s in res.per_suite.values()) > 0
    out = _results(clean_data)
    assert out["success"] is True and out["failed"] == []
    assert out["suite_parameters"]["labels"] == LABELS
    index = clean_data.data_docs / "index.html"
    assert "<html" in index.read_text().lower()
    pages = {p.stem for p in (clean_data.data_docs / "expectations").glob("*.html")}
    assert pages == set(validate.TABLES)
    assert [p.name for p in clean_data.data_docs.iterdir() if p.name.startswith(".")] == []  # no working copy left
    require_passed(clean_data.validation)  # does not raise


def test_result_is_deterministic_and_apart_from_data_docs(clean_data):
    """Downstream stages depend on the result file: rerunning on the same data must not change a byte
    of it (the Data Docs, which embed timestamps, live in another output)."""
    _run(clean_data)
    first = clean_data.validation.read_bytes()
    _run(clean_data)
    assert clean_data.validation.read_bytes() == first
    assert not clean_data.validation.is_relative_to(clean_data.data_docs)
    out = json.loads(first)
    records = [r for suite in out["suites"].values() for r in suite["results"]]
    assert len(records) == out["evaluated"] and all(
        {"expectation", "kwargs", "success", "result"} <= set(r) for r in records
    )
    leftovers = [p.name for p in clean_data.validation.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the atomic writers left no temporary files behind


def test_a_run_leaves_the_repository_project_untouched(clean_data):
    """GE writes into its project as it runs; the stage runs a copy, so the repository's gx/ stays as it is."""
    paths = clean_data.model_copy(update={"gx": ROOT / "gx"})

    def state():
        files = sorted((str(p), p.stat().st_mtime_ns, p.read_bytes()) for p in paths.gx.rglob("*") if p.is_file())
        status = subprocess.run(
            ["git", "status", "--porcelain", "--ignored", "--", "gx"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return files, status.stdout

    before = state()
    _run(paths)
    assert state() == before


def test_user_data_labels_come_from_the_training_split(clean_data):
    assert _run(clean_data, packages=[], stdlib=False).success


def test_configured_labels_override_the_packages(clean_data):
    assert _run(clean_data, packages=["x", "y"], labels=LABELS).success
    df = pd.read_parquet(clean_data.clean_labeled)
    first_ui = df.loc[(df["split"] == "train") & (df["label"] == "ui"), "id"].iloc[0]
    _fails_with(clean_data, "train: expect_column_values_to_be_in_set(label)", first_ui, labels=["db", "net"])


def _drop(column):
    return lambda df: df.drop(columns=[column])


def _set(split, column, value, n=1):
    def edit(df):
        df.loc[_rows(df, split)[:n], column] = value
        return df

    return edit


def _duplicate_id(df):
    rows = _rows(df, "val")
    df.loc[rows[1], "id"] = df.loc[rows[0], "id"]
    return df


def _duplicate_texts(df):  # 3 of train's 144 rows repeat another row's text
    rows = _rows(df, "train")
    df.loc[rows[1:4], "text"] = df.loc[rows[0], "text"]
    return df


def _shrink_class(df):  # net keeps 8 of its 48 training rows: 8 / 104 < 0.1
    net = df.index[(df["split"] == "train") & (df["label"] == "net")]
    return df.drop(net[8:])


def _single_class(df):
    df.loc[_rows(df, "test"), "label"] = "db"
    return df


def _leak_source(df):
    df.loc[_rows(df, "test")[0], "source"] = df.loc[_rows(df, "train")[0], "source"]
    return df


def _first_id(split):
    return lambda df: df.loc[_rows(df, split)[0], "id"]


# (what breaks, the table edited, the edit, the failing expectation, the id of an offending row or None,
#  validate params)
FAILURES = [
    ("missing column", "labeled", _drop("source"), "train: expect_table_columns_to_match_set(", None, {}),
    (
        "null text",
        "labeled",
        _set("train", "text", None),
        "train: expect_column_values_to_not_be_null(text)",
        _first_id("train"),
        {},
    ),
    ("duplicate id", "labeled", _duplicate_id, "val: expect_column_values_to_be_unique(id)", _first_id("val"), {}),
    (
        "too long text",
        "corpus",
        lambda df: df.assign(text=df["text"].where(df.index != 2, "x" * 70000)),
        "corpus: expect_column_value_lengths_to_be_between(text",
        lambda df: df.loc[2, "id"],
        {},
    ),
    (
        "unknown label",
        "labeled",
        _set("val", "label", "zzz"),
        "val: expect_column_values_to_be_in_set(label)",
        _first_id("val"),
        {},
    ),
    (
        "class below min share",
        "labeled",
        _shrink_class,
        "classes: expect_column_values_to_be_between(share",
        lambda df: "train/net",
        {"min_class_share": 0.1},
    ),
    ("single class", "labeled", _single_class, "test: expect_column_unique_value_count_to_be_between(label", None, {}),
    (
        "duplicate ratio",
        "labeled",
        _duplicate_texts,
        "train: expect_column_values_to_be_unique(text, mostly=0.99)",
        _first_id("train"),
        {"max_duplicate_ratio": 0.01},
    ),
    (
        "source in two splits",
        "labeled",
        _leak_source,
        "splits: expect_column_values_to_be_unique(source)",
        _first_id("test"),
        {},
    ),
]


@pytest.mark.parametrize(
    "table, edit, expectation, row_id, cfg", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES]
)
def test_each_kind_of_failure_names_its_expectation_and_a_row(clean_data, table, edit, expectation, row_id, cfg):
    path = clean_data.clean_corpus if table == "corpus" else clean_data.clean_labeled
    before = pd.read_parquet(path)
    _edit(path, edit)
    failure = _fails_with(clean_data, expectation, row_id(before) if row_id else None, **cfg)
    assert len(failure) < 400, failure  # samples are truncated


def test_single_class_summary_shows_what_ge_observed(clean_data):
    _edit(clean_data.clean_labeled, _single_class)
    failure = _fails_with(clean_data, "test: expect_column_unique_value_count_to_be_between(label", None)
    assert failure.endswith("observed 1"), failure


def test_a_duplicate_ratio_under_the_ceiling_passes(clean_data):
    _edit(clean_data.clean_labeled, _duplicate_texts)
    assert _run(clean_data, max_duplicate_ratio=0.05).success


def test_rows_without_ids_are_one_line_naming_the_file(clean_data):
    _edit(clean_data.clean_corpus, _drop("id"))
    with pytest.raises(UserError, match=r"corpus.parquet: missing column\(s\) \['id'\]"):
        _run(clean_data)


def test_a_broken_suite_is_one_line_naming_the_project(clean_data):
    (clean_data.gx / "expectations" / "train.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot load the Great Expectations project"):
        _run(clean_data)


def test_a_failure_replaces_an_earlier_pass(clean_data):
    _run(clean_data)
    require_passed(clean_data.validation)
    _edit(clean_data.clean_labeled, _set("train", "text", None))
    with pytest.raises(UserError):
        _run(clean_data)
    with pytest.raises(UserError):
        require_passed(clean_data.validation)


def test_require_passed_without_results(tiny_project):
    with pytest.raises(UserError, match="no validation result"):
        require_passed(tiny_project.validation)


def test_suite_parameters_cover_every_parameter_the_suites_use():
    """Every `$PARAMETER` in gx/expectations/ has a value from params.yaml (a typo would fail every run)."""
    used = set()
    for f in (ROOT / "gx" / "expectations").glob("*.json"):
        if f.stem in kg_data.CHECKS + align_data.CHECKS:  # the tasks' own suites (tests/unit/test_kg_data.py, ...)
            continue
        for e in json.loads(f.read_text())["expectations"]:
            used |= {v["$PARAMETER"] for v in e["kwargs"].values() if isinstance(v, dict) and "$PARAMETER" in v}
    assert used == set(validate.suite_parameters(TINY_VALIDATE, TINY_CLEAN, LABELS))
    assert {f.stem for f in (ROOT / "gx" / "checkpoints").glob("*.json")} == {
        *validate.TABLES,
        *kg_data.CHECKS,
        *align_data.CHECKS,
    }
    assert not Path(ROOT / "data" / "expectations").exists()
