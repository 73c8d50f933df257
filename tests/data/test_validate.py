"""Data contracts: the Great Expectations suites pass on good data and name what breaks on bad data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import LABELS, TINY_CLEAN, TINY_VALIDATE
from tasks import validate
from tasks.shared.errors import UserError
from tasks.shared.validation import require_passed


def _run(paths, labels=LABELS, stdlib=True):
    return validate.run(TINY_VALIDATE, TINY_CLEAN, labels, stdlib, paths)


def _results(paths) -> dict:
    return json.loads(paths.validation.read_text())


def _edit_labeled(paths, edit) -> None:
    df = pd.read_parquet(paths.clean_labeled)
    edit(df)
    df.to_parquet(paths.clean_labeled, index=False)


def _fails_with(paths, expectation: str, **kw) -> str:
    with pytest.raises(UserError) as err:
        _run(paths, **kw)
    msg = str(err.value)
    assert msg.startswith("data validation failed")
    assert expectation in msg, msg
    res = _results(paths)
    assert res["success"] is False
    assert any(expectation in f for f in res["failed"])
    with pytest.raises(UserError, match="data validation failed"):
        require_passed(paths.validation)
    return msg


def test_good_data_passes_and_writes_results_and_docs(tiny_clean):
    res = _run(tiny_clean)
    assert res.success and res.failed == []
    assert set(res.per_suite) == set(validate.SUITES)
    assert res.evaluated == sum(s["evaluated"] for s in res.per_suite.values()) > 0
    out = _results(tiny_clean)
    assert out["success"] is True and out["failed"] == []
    assert out["suite_parameters"]["labels"] == LABELS
    assert out["suite_parameters"]["n_label_splits"] == 9
    index = list(tiny_clean.data_docs.rglob("index.html"))
    assert index and "<html" in index[0].read_text().lower()
    require_passed(tiny_clean.validation)  # does not raise


def test_result_is_deterministic_and_apart_from_data_docs(tiny_clean):
    """Downstream stages depend on the result file: rerunning on the same data must not change a byte
    of it (the Data Docs, which embed timestamps, live in another output)."""
    _run(tiny_clean)
    first = tiny_clean.validation.read_bytes()
    _run(tiny_clean)
    assert tiny_clean.validation.read_bytes() == first
    assert not tiny_clean.validation.is_relative_to(tiny_clean.data_docs)
    out = json.loads(first)
    records = [r for suite in out["suites"].values() for r in suite["results"]]
    assert len(records) == out["evaluated"] and all({"expectation", "kwargs", "success", "result"} <= set(r) for r in records)
    leftovers = [p.name for p in tiny_clean.validation.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the atomic writer left no temporary files behind


def test_user_data_labels_come_from_the_training_split(tiny_clean):
    assert _run(tiny_clean, labels=[], stdlib=False).success


def test_file_in_two_splits_fails(tiny_clean):
    def leak(df):
        train_source = df.loc[df["split"] == "train", "source"].iloc[0]
        test_row = df.index[df["split"] == "test"][0]
        df.loc[test_row, "source"] = train_source

    _edit_labeled(tiny_clean, leak)
    msg = _fails_with(tiny_clean, "expect_column_values_to_be_unique")
    assert msg.count("splits: ") == 1  # the splits suite, not the text uniqueness check


def test_label_outside_configured_set_fails(tiny_clean):
    msg = _fails_with(tiny_clean, "expect_column_values_to_be_in_set", labels=["db", "net"])
    assert "ui" in msg


def test_label_missing_from_training_fails_for_user_data(tiny_clean):
    def relabel(df):
        df.loc[df.index[df["split"] == "test"][:2], "label"] = "zzz"

    _edit_labeled(tiny_clean, relabel)
    msg = _fails_with(tiny_clean, "expect_column_values_to_be_in_set", labels=[], stdlib=False)
    assert "zzz" in msg


def test_null_text_fails(tiny_clean):
    def null(df):
        df.loc[df.index[0], "text"] = None

    _edit_labeled(tiny_clean, null)
    msg = _fails_with(tiny_clean, "expect_column_values_to_not_be_null")
    assert "'column': 'text'" in msg


def test_too_short_text_fails(tiny_clean):
    def shorten(df):
        df.loc[df.index[0], "text"] = "x = 1"

    _edit_labeled(tiny_clean, shorten)
    msg = _fails_with(tiny_clean, "expect_column_value_lengths_to_be_between")
    assert "x = 1" in msg


def test_too_few_rows_per_label_and_split_fails(tiny_clean):
    def drop(df):
        df.drop(df.index[(df["label"] == "net") & (df["split"] == "val")], inplace=True)

    _edit_labeled(tiny_clean, drop)
    _fails_with(tiny_clean, "expect_table_row_count_to_equal")


def test_a_failure_replaces_an_earlier_pass(tiny_clean):
    _run(tiny_clean)
    require_passed(tiny_clean.validation)

    def null(df):
        df.loc[df.index[0], "text"] = None

    _edit_labeled(tiny_clean, null)
    with pytest.raises(UserError):
        _run(tiny_clean)
    with pytest.raises(UserError):
        require_passed(tiny_clean.validation)


def test_require_passed_without_results(tiny_project):
    with pytest.raises(UserError, match="no validation result"):
        require_passed(tiny_project.validation)
