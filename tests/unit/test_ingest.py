"""ingest: source parsing, file-level split assignment, user data, and errors that name the file."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest

from tasks import ingest
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.errors import UserError

SOURCE = '''"""Module doc."""

import functools


def top(a, b):
    """Add two numbers."""
    def inner():
        return a
    return a + b


class Thing:
    """A thing."""

    @functools.cache
    def cached(self):
        return 1

    async def fetch(self, url):
        """Fetch a url."""
        return url


async def main():
    pass
'''


def test_functions_extracts_top_level_functions_and_methods_with_decorators():
    tree = ast.parse(SOURCE)
    funcs = ingest.functions(tree, SOURCE)
    assert len(funcs) == 4
    assert funcs[0].startswith("def top(a, b):") and "def inner():" in funcs[0] and funcs[0].endswith("return a + b")
    assert funcs[1] == "async def main():\n    pass"
    # methods are dedented and keep their decorator
    assert funcs[2] == "@functools.cache\ndef cached(self):\n    return 1"
    assert funcs[3].startswith("async def fetch(self, url):")
    assert not any(f.startswith("def inner") for f in funcs)


def test_docstrings_of_module_classes_and_functions():
    docs = ingest.docstrings(ast.parse(SOURCE))
    assert sorted(docs) == sorted(["Module doc.", "Add two numbers.", "A thing.", "Fetch a url."])


def _cfg(**kw) -> IngestConfig:
    base = {"corpus": "x.txt", "labeled": "y.jsonl", "min_examples_per_label": 1, "val_fraction": 0.15, "test_fraction": 0.15, "seed": 7}
    return IngestConfig(**{**base, **kw})


def test_assign_splits_each_group_in_exactly_one_split_and_every_split_filled():
    groups = pd.DataFrame(
        [{"group": f"a/{i}.py", "label": "a", "n": 1 + i % 5} for i in range(40)]
        + [{"group": f"b/{i}.py", "label": "b", "n": 3} for i in range(3)]
        + [{"group": "c/only.py", "label": "c", "n": 50}]
    )
    mapping = ingest.assign_splits(groups, _cfg())
    assert set(mapping) == set(groups["group"])  # every group assigned, once (dict keys)
    assert set(mapping.values()) <= set(ingest.SPLITS)
    rows = groups.assign(split=groups["group"].map(mapping))
    a = rows[rows["label"] == "a"].groupby("split")["n"].sum()
    assert set(a.index) == set(ingest.SPLITS)
    total = a.sum()
    # test and val each take about their fraction (quota filling overshoots by at most one group)
    for split in ("val", "test"):
        assert 0.15 * total <= a[split] <= 0.15 * total + 5
    # a label with one group always keeps it for training
    assert mapping["c/only.py"] == "train"
    # the last group of any label is train, so every label has training rows
    assert (rows[rows["label"] == "b"]["split"] == "train").any()


def test_assign_splits_is_deterministic_and_seeded():
    groups = pd.DataFrame([{"group": f"g{i}", "label": "a", "n": 1} for i in range(30)])
    m1 = ingest.assign_splits(groups, _cfg(seed=1))
    assert m1 == ingest.assign_splits(groups, _cfg(seed=1))
    assert m1 != ingest.assign_splits(groups, _cfg(seed=2))


def test_split_labeled_on_user_style_rows():
    df = pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(90)],
            "label": ["x"] * 60 + ["y"] * 30,
            "source": [f"row-{i}" for i in range(90)],
        }
    )
    out = ingest.split_labeled(df, _cfg())
    assert len(out) == 90 and out["split"].notna().all()
    assert out.groupby("source")["split"].nunique().max() == 1
    for label, n in (("x", 60), ("y", 30)):
        counts = out[out["label"] == label]["split"].value_counts()
        assert set(counts.index) == set(ingest.SPLITS)
        assert counts["test"] == pytest.approx(0.15 * n, abs=1)
        assert counts["val"] == pytest.approx(0.15 * n, abs=1)


def test_split_labeled_keeps_multi_row_files_together():
    df = pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(60)],
            "label": ["x"] * 60,
            "source": [f"file{i // 4}.py" for i in range(60)],
        }
    )
    out = ingest.split_labeled(df, _cfg())
    assert out.groupby("source")["split"].nunique().max() == 1
    assert set(out["split"]) == set(ingest.SPLITS)


def _user_data(tmp_path, n_per_label: int = 20):
    labeled = tmp_path / "user" / "labeled.jsonl"
    labeled.parent.mkdir(parents=True)
    rows = [{"text": f"def {lab}_{i}(): return {i}", "label": lab} for lab in ("alpha", "beta") for i in range(n_per_label)]
    labeled.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    corpus = tmp_path / "user" / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"doc{i}.txt").write_text(f"document number {i}\nwith two lines\n")
    (corpus / "notes.md").write_text("# notes\nmarkdown counts too\n")
    return labeled, corpus


def test_run_with_user_data(tiny_project, tmp_path):
    labeled, corpus = _user_data(tmp_path)
    res = ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled), min_examples_per_label=10), tiny_project)

    assert res.labeled_rows == 40 and res.corpus_rows == 6
    assert res.labels == ["alpha", "beta"]
    assert sum(res.rows_per_split.values()) == 40 and all(res.rows_per_split[s] > 0 for s in ingest.SPLITS)
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert list(out.columns) == ["text", "label", "source", "split"]
    assert sorted(out["text"]) == sorted(json.loads(line)["text"] for line in labeled.read_text().splitlines())
    for lab in ("alpha", "beta"):
        assert set(out.loc[out["label"] == lab, "split"]) == set(ingest.SPLITS)
    c = pd.read_parquet(tiny_project.raw_corpus)
    assert list(c.columns) == ["text", "source", "kind"]
    assert set(c["kind"]) == {"text"}
    assert "document number 3\nwith two lines\n" in set(c["text"])


def test_run_keeps_user_split_column(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    pd.DataFrame(
        {"text": [f"t{i}" for i in range(6)], "label": ["a", "b"] * 3, "split": ["train", "train", "val", "val", "test", "test"]}
    ).to_csv(labeled, index=False)
    corpus = tmp_path / "c.txt"
    corpus.write_text("some corpus text")
    ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled)), tiny_project)
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert out["split"].tolist() == ["train", "train", "val", "val", "test", "test"]


def test_bad_user_split_value_names_file(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"], "split": ["train", "dev"]}).to_csv(labeled, index=False)
    msg = _ingest_error(tiny_project, labeled, labeled)
    assert "dev" in msg and str(labeled) in msg


def _assert_no_outputs(paths) -> None:
    assert not paths.raw_labeled.exists()
    assert not paths.raw_corpus.exists()


def _ingest_error(paths, corpus, labeled, **kw) -> str:
    """Run ingest on bad input: it must raise a UserError and leave no outputs; returns the message."""
    with pytest.raises(UserError) as err:
        ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled), **kw), paths)
    _assert_no_outputs(paths)
    return str(err.value)


def test_missing_labeled_path(tiny_project, tmp_path):
    _, corpus = _user_data(tmp_path)
    missing = tmp_path / "user" / "nope.jsonl"
    msg = _ingest_error(tiny_project, corpus, missing)
    assert msg == f"{missing}: data path not found"


def test_missing_corpus_path(tiny_project, tmp_path):
    labeled, _ = _user_data(tmp_path)
    missing = tmp_path / "nowhere"
    msg = _ingest_error(tiny_project, missing, labeled)
    assert str(missing) in msg


def test_empty_jsonl_file(tiny_project, tmp_path):
    _, corpus = _user_data(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    msg = _ingest_error(tiny_project, corpus, empty)
    assert str(empty) in msg and "no rows" in msg


def test_empty_csv_file(tiny_project, tmp_path):
    _, corpus = _user_data(tmp_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    msg = _ingest_error(tiny_project, corpus, empty)
    assert str(empty) in msg


def test_malformed_jsonl_row_names_file_and_row(tiny_project, tmp_path):
    labeled, corpus = _user_data(tmp_path)
    lines = labeled.read_text().splitlines()
    lines[6] = '{"text": "broken", "label": '
    labeled.write_text("\n".join(lines) + "\n")
    msg = _ingest_error(tiny_project, corpus, labeled)
    assert msg.startswith(f"{labeled}: row 7: invalid JSON")
    assert "\n" not in msg


def test_missing_label_column_names_file(tiny_project, tmp_path):
    _, corpus = _user_data(tmp_path)
    labeled = tmp_path / "nolabel.jsonl"
    labeled.write_text('{"text": "abc"}\n')
    msg = _ingest_error(tiny_project, corpus, labeled)
    assert str(labeled) in msg and "label" in msg


def test_too_few_examples_per_label_is_an_error(tiny_project, tmp_path):
    labeled, corpus = _user_data(tmp_path, n_per_label=5)
    msg = _ingest_error(tiny_project, corpus, labeled, min_examples_per_label=6)
    assert "ingest.min_examples_per_label" in msg and "alpha" in msg


def test_corpus_excludes_held_out_sources(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    df = pd.DataFrame(
        {"text": [f"t{i}" for i in range(6)], "label": ["a", "b"] * 3, "source": [f"s{i}" for i in range(6)], "split": ["train", "train", "val", "val", "test", "test"]}
    )
    df.to_csv(labeled, index=False)
    corpus = tmp_path / "corpus.csv"
    pd.DataFrame({"text": [f"doc {i}" for i in range(6)], "source": [f"s{i}" for i in range(6)]}).to_csv(corpus, index=False)
    res = ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled)), tiny_project)
    assert res.corpus_rows == 2
    assert sorted(pd.read_parquet(tiny_project.raw_corpus)["source"]) == ["s0", "s1"]
