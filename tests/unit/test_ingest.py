"""ingest: source parsing, file-level split assignment, user data, and errors that name the file."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest

from tasks import ingest
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.errors import UserError
from tasks.shared.splits import OVERSHOOT, assign_splits

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
    base = {
        "corpus": "x.txt",
        "labeled": "y.jsonl",
        "min_examples_per_label": 1,
        "val_fraction": 0.15,
        "test_fraction": 0.15,
        "seed": 7,
    }
    return IngestConfig(**{**base, **kw})


def test_assign_splits_each_group_in_exactly_one_split_and_every_split_filled():
    groups = pd.DataFrame(
        [{"group": f"a/{i}.py", "label": "a", "n": 1 + i % 5} for i in range(40)]
        + [{"group": f"b/{i}.py", "label": "b", "n": 3} for i in range(3)]
        + [{"group": "c/only.py", "label": "c", "n": 50}]
    )
    mapping = assign_splits(groups, _cfg())
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
    m1 = assign_splits(groups, _cfg(seed=1))
    assert m1 == assign_splits(groups, _cfg(seed=1))
    assert m1 != assign_splits(groups, _cfg(seed=2))


def test_run_writes_the_users_spans_or_an_empty_span_table(tiny_project, tmp_path):
    labeled, corpus = _user_data(tmp_path)
    cfg = {"corpus": str(corpus), "labeled": str(labeled), "min_examples_per_label": 10}
    res = ingest.run(_cfg(**cfg), tiny_project)
    empty = pd.read_parquet(tiny_project.kg_raw)
    assert (
        res.span_rows == 0 and empty.empty and list(empty.columns) == ["id", "text", "source", "entities", "relations"]
    )
    spans = tmp_path / "user" / "spans.jsonl"
    spans.write_text(json.dumps({"text": "Ann met Bo.", "entities": [{"start": 0, "end": 3, "label": "PER"}]}) + "\n")
    res = ingest.run(_cfg(**cfg, spans=str(spans)), tiny_project)
    out = pd.read_parquet(tiny_project.kg_raw)
    assert res.span_rows == 1 and out["id"].tolist() == [f"{spans}#1"]
    assert json.loads(out["entities"][0]) == [{"start": 0, "end": 3, "label": "PER"}]
    spans.write_text(json.dumps({"text": "Ann", "entities": [{"start": 0, "end": 9, "label": "PER"}]}) + "\n")
    with pytest.raises(UserError, match=r"spans.jsonl: row 1: entities\[0\] \[0, 9\) is out of range"):
        ingest.run(_cfg(**cfg, spans=str(spans)), tiny_project)


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
    rows = [
        {"text": f"def {lab}_{i}(): return {i}", "label": lab} for lab in ("alpha", "beta") for i in range(n_per_label)
    ]
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
    assert list(out.columns) == ["id", "text", "label", "source", "split"]
    assert sorted(out["text"]) == sorted(json.loads(line)["text"] for line in labeled.read_text().splitlines())
    for lab in ("alpha", "beta"):
        assert set(out.loc[out["label"] == lab, "split"]) == set(ingest.SPLITS)
    c = pd.read_parquet(tiny_project.raw_corpus)
    assert list(c.columns) == ["id", "text", "source", "kind"]
    assert set(c["kind"]) == {"text"}
    assert "document number 3\nwith two lines\n" in set(c["text"])


def test_run_keeps_user_split_column(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    pd.DataFrame(
        {
            "text": [f"t{i}" for i in range(6)],
            "label": ["a", "b"] * 3,
            "split": ["train", "train", "val", "val", "test", "test"],
        }
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
        {
            "text": [f"t{i}" for i in range(6)],
            "label": ["a", "b"] * 3,
            "source": [f"s{i}" for i in range(6)],
            "split": ["train", "train", "val", "val", "test", "test"],
        }
    )
    df.to_csv(labeled, index=False)
    corpus = tmp_path / "corpus.csv"
    pd.DataFrame({"text": [f"doc {i}" for i in range(6)], "source": [f"s{i}" for i in range(6)]}).to_csv(
        corpus, index=False
    )
    res = ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled)), tiny_project)
    assert res.corpus_rows == 2 and res.metrics["corpus_held_out"] == 4
    assert sorted(pd.read_parquet(tiny_project.raw_corpus)["source"]) == ["s0", "s1"]


def _jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _labeled_rows(n: int = 20) -> list[dict]:
    return [{"text": f"def f{i}(): return {i}", "label": "ab"[i % 2]} for i in range(n)]


def test_generated_ids_never_collide_so_no_corpus_row_is_held_out(tiny_project, tmp_path, capsys):
    """Neither file has a `source` column: row ids are per file, and the corpus keeps every row."""
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows(40))
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": f"corpus document {i}"} for i in range(100)])
    res = ingest.run(_cfg(corpus=corpus, labeled=labeled), tiny_project)
    assert res.corpus_rows == 100 and res.metrics["corpus_held_out"] == 0 and res.metrics["corpus_blank"] == 0
    c = pd.read_parquet(tiny_project.raw_corpus)
    assert c["source"].tolist()[:2] == [f"corpus:{corpus}#row-1", f"corpus:{corpus}#row-2"]
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert out["source"].str.startswith(f"labeled:{labeled}#row-").all() and out["source"].is_unique
    assert "left out" not in capsys.readouterr().out


def test_held_out_corpus_rows_are_counted_and_reported(tiny_project, tmp_path, capsys):
    rows = [{**r, "source": f"file{i % 10}.py"} for i, r in enumerate(_labeled_rows(40))]
    labeled = _jsonl(tmp_path / "labeled.jsonl", rows)
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": f"doc {i}", "source": f"file{i}.py"} for i in range(10)])
    res = ingest.run(_cfg(corpus=corpus, labeled=labeled), tiny_project)
    out = pd.read_parquet(tiny_project.raw_labeled)
    held = set(out.loc[out["split"] != "train", "source"])
    assert 0 < len(held) < 10
    assert res.metrics["corpus_held_out"] == len(held) and res.corpus_rows == 10 - len(held)
    assert set(pd.read_parquet(tiny_project.raw_corpus)["source"]).isdisjoint(held)
    lines = [line for line in capsys.readouterr().out.splitlines() if "left out" in line]
    what = "corpus rows left out of pretraining (their source is in the labeled val/test splits)"
    assert len(lines) == 1 and lines[0].startswith(f"ingest: {what}: {len(held)} (e.g. {corpus}: row ")


def test_blank_corpus_rows_are_dropped_counted_and_reported(tiny_project, tmp_path, capsys):
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    docs = tmp_path / "docs"
    docs.mkdir()
    _jsonl(
        docs / "c.jsonl",
        [{"text": "doc one"}, {"text": None}, {"text": " \t\n"}, {"text": "doc two", "kind": 3}, '{"text": NaN}'],
    )
    (docs / "empty.txt").write_text("")
    (docs / "full.txt").write_text("a text file")
    res = ingest.run(_cfg(corpus=str(docs), labeled=labeled), tiny_project)
    assert res.corpus_rows == 3 and res.metrics["corpus_blank"] == 4
    c = pd.read_parquet(tiny_project.raw_corpus)
    assert c["text"].tolist() == ["doc one", "doc two", "a text file"] and c["kind"].tolist() == ["text", "3", "text"]
    out = capsys.readouterr().out.splitlines()
    line = next(line for line in out if line.startswith("ingest: corpus rows dropped"))
    c = docs / "c.jsonl"
    assert line == f"ingest: corpus rows dropped (text missing or blank): 4 (e.g. {c}: row 2, {c}: row 3, {c}: row 5)"


def test_numbers_as_labels_and_sources_become_strings(tiny_project, tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2, "source": i} for i in range(19)] + [
        {"text": "t19", "label": 1.0, "source": 19}
    ]
    labeled = _jsonl(tmp_path / "labeled.jsonl", rows)
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": "doc"}])
    res = ingest.run(_cfg(corpus=corpus, labeled=labeled), tiny_project)
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert res.labels == ["0", "1"] and out["label"].value_counts().to_dict() == {"0": 10, "1": 10}
    assert sorted(out["source"], key=int) == [str(i) for i in range(20)]


def test_labeled_csv_keeps_na_like_texts_and_numeric_labels(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    labeled.write_text("text,label,split\nNA,1,train\nnull,2,train\nNone,1,val\nnan,2,test\n")
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": "doc"}])
    ingest.run(_cfg(corpus=corpus, labeled=str(labeled)), tiny_project)
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert out["text"].tolist() == ["NA", "null", "None", "nan"] and out["label"].tolist() == ["1", "2", "1", "2"]


GOOD = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(20)]
SPLIT = [{**r, "split": ("train", "train", "val", "val", "test", "test")[i % 6]} for i, r in enumerate(GOOD[:12])]
NO_LABEL = "label is missing or blank (every labeled row needs one; fix or remove the row)"
NO_TEXT = "text is missing or blank (every labeled row needs one; fix or remove the row)"
SPLIT_ADVICE = "(rows are split by whole source: add rows or distinct sources, or give a split column)"

# (labeled rows, the error after "<file>: "; {f} is the file); rows are 1-based lines of the jsonl file
BAD_LABELED = [
    pytest.param(GOOD[:4] + [{"text": "x", "label": None}] + GOOD[4:], f"row 5: {NO_LABEL}", id="null-label"),
    pytest.param(
        GOOD[:2] + [{"text": "x"}, {"text": "y", "label": ""}, {"text": "z", "label": "  "}] + GOOD,
        f"row 3: {NO_LABEL} (and 2 more: {{f}}: row 4, {{f}}: row 5)",
        id="absent-empty-blank-labels",
    ),
    pytest.param(GOOD + [{"text": None, "label": "a"}], f"row 21: {NO_TEXT}", id="null-text"),
    pytest.param(GOOD + ['{"text": NaN, "label": "a"}'], f"row 21: {NO_TEXT}", id="nan-text"),
    pytest.param(GOOD + [{"text": " \t", "label": "a"}], f"row 21: {NO_TEXT}", id="blank-text"),
    pytest.param(
        GOOD[:1] + [{"text": {"code": "x"}, "label": "a"}],
        "row 2: text is dict {'code': 'x'}, not a string",
        id="dict-text",
    ),
    pytest.param(GOOD[:1] + [{"text": ["x"], "label": "a"}], "row 2: text is list ['x'], not a string", id="list-text"),
    pytest.param(GOOD[:1] + [{"text": 42, "label": "a"}], "row 2: text is int 42, not a string", id="int-text"),
    pytest.param(
        GOOD[:1] + [{"text": "x", "label": True}],
        "row 2: label is bool True, not a string or an integer",
        id="bool-label",
    ),
    pytest.param(
        GOOD[:1] + [{"text": "x", "label": 0.5}],
        "row 2: label is float 0.5, not a string or an integer",
        id="float-label",
    ),
    pytest.param(
        GOOD[:1] + [{"text": "x", "label": "a", "source": {"f": 1}}],
        "row 2: source is dict {'f': 1}, not a string or an integer",
        id="dict-source",
    ),
    pytest.param(
        SPLIT[:3] + [{**SPLIT[3], "split": None}] + SPLIT[4:],
        "row 4: split is missing (give every row one of ['train', 'val', 'test'], or drop the column)",
        id="null-split",
    ),
    pytest.param(
        SPLIT + [{**GOOD[0], "split": "dev"}],
        "row 13: split is 'dev'; allowed: ['train', 'val', 'test']",
        id="bad-split",
    ),
    pytest.param(GOOD[:1] + ["[1, 2]"], "row 2: expected a JSON object, got an array", id="array-row"),
    pytest.param(
        [{"text": f"t{i}", "label": "only"} for i in range(10)],
        "labeled set has a single label 'only'; a classifier needs at least 2",
        id="single-label",
    ),
    pytest.param(
        [{"text": f"t{i}", "label": 7} for i in range(10)],
        "labeled set has a single label '7'; a classifier needs at least 2",
        id="single-int-label",
    ),
    pytest.param(
        SPLIT + [{"text": "c", "label": "c", "split": "val"}],
        "labels ['c'] have no rows in the train split; a classifier cannot learn them",
        id="label-without-train-rows",
    ),
    pytest.param(
        [r for r in SPLIT if r["split"] != "test"], f"the test split is empty {SPLIT_ADVICE}", id="empty-test-split"
    ),
    pytest.param(
        [{**r, "source": "one.py"} for r in GOOD], f"the val and test splits are empty {SPLIT_ADVICE}", id="one-source"
    ),
]


@pytest.mark.parametrize(("rows", "error"), BAD_LABELED)
def test_bad_labeled_rows_are_one_line_errors_naming_file_and_row(tiny_project, tmp_path, rows, error):
    labeled = _jsonl(tmp_path / "labeled.jsonl", rows)
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": "doc"}])
    msg = _ingest_error(tiny_project, corpus, labeled)
    assert msg == f"{labeled}: " + error.replace("{f}", labeled)


# (corpus rows, the error after "<file>: ")
BAD_CORPUS = [
    pytest.param([{"text": "ok"}, {"text": {"a": 1}}], "row 2: text is dict {'a': 1}, not a string", id="dict-text"),
    pytest.param([{"text": "ok"}, {"text": 3.5}], "row 2: text is float 3.5, not a string", id="float-text"),
    pytest.param(
        [{"text": "x", "kind": ["code"]}], "row 1: kind is list ['code'], not a string or an integer", id="list-kind"
    ),
    pytest.param(['"a string"'], "row 1: expected a JSON object, got a string", id="string-row"),
]


@pytest.mark.parametrize(("rows", "error"), BAD_CORPUS)
def test_bad_corpus_rows_are_one_line_errors_naming_file_and_row(tiny_project, tmp_path, rows, error):
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    corpus = _jsonl(tmp_path / "corpus.jsonl", rows)
    assert _ingest_error(tiny_project, corpus, labeled) == f"{corpus}: {error}"


def test_a_folder_whose_files_lack_the_split_column_names_the_file(tiny_project, tmp_path):
    folder = tmp_path / "labeled"
    folder.mkdir()
    pd.DataFrame(SPLIT).to_csv(folder / "a.csv", index=False)
    _jsonl(folder / "b.jsonl", GOOD[:2])
    msg = _ingest_error(tiny_project, _jsonl(tmp_path / "c.jsonl", [{"text": "doc"}]), folder)
    b = folder / "b.jsonl"
    missing = "split is missing (give every row one of ['train', 'val', 'test'], or drop the column)"
    assert msg == f"{b}: row 1: {missing} (and 1 more: {b}: row 2)"


def test_every_corpus_row_blank_is_an_error(tiny_project, tmp_path):
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": ""}, {"text": None}])
    msg = _ingest_error(tiny_project, corpus, _jsonl(tmp_path / "labeled.jsonl", _labeled_rows()))
    assert (
        msg
        == f"ingest.corpus ({corpus}): no documents (every row's text is missing or blank, or its source is held out)"
    )


def test_assign_splits_keeps_a_file_bigger_than_the_quota_out_of_the_held_out_splits():
    # one file is half the label's rows: wherever the seeded order puts it, it stays in train
    groups = pd.DataFrame(
        [{"group": "big.py", "label": "a", "n": 100}] + [{"group": f"f{i}.py", "label": "a", "n": 5} for i in range(20)]
    )
    for seed in range(5):
        mapping = assign_splits(groups, _cfg(seed=seed))
        assert mapping["big.py"] == "train"
        rows = groups.assign(split=groups["group"].map(mapping)).groupby("split")["n"].sum()
        for split in ("val", "test"):
            assert 0 < rows[split] <= OVERSHOOT * 0.15 * 200


def test_assign_splits_gives_an_empty_held_out_split_the_smallest_train_file():
    # no file fits (each is a third of the label, over 1.5 x the 15% quota): test and val still get one file each
    groups = pd.DataFrame([{"group": f"f{i}.py", "label": "a", "n": 30 + i} for i in range(3)])
    mapping = assign_splits(groups, _cfg())
    assert mapping["f2.py"] == "train"
    assert {mapping["f0.py"], mapping["f1.py"]} == {"test", "val"}


def test_configured_columns_ids_and_globs(tiny_project, tmp_path):
    """`text_column`/`label_column`/`id_column` name the user's columns; globs and lists pick the files."""
    d = tmp_path / "user"
    d.mkdir()
    rows = [
        {"body": f"def f{i}(): return {i}", "tag": "ab"[i % 2], "uid": f"u{i}", "label": "ignored"} for i in range(40)
    ]
    pd.DataFrame(rows[:20]).to_parquet(d / "part-0.parquet")
    _jsonl(d / "part-1.jsonl", rows[20:])
    (d / "notes.csv").write_text("body\nnot part of the glob\n")
    _jsonl(d / "c1.jsonl", [{"body": f"corpus {i}", "uid": i} for i in range(3)])
    _jsonl(d / "c2.jsonl", [{"body": "no id here"}])
    cfg = _cfg(
        corpus=[str(d / "c*.jsonl")], labeled=str(d / "part-*"), text_column="body", label_column="tag", id_column="uid"
    )
    res = ingest.run(cfg, tiny_project)
    assert res.labeled_rows == 40 and res.labels == ["a", "b"] and res.corpus_rows == 4
    out = pd.read_parquet(tiny_project.raw_labeled)
    assert sorted(out["id"]) == sorted(r["uid"] for r in rows) and set(out["label"]) == {"a", "b"}
    c = pd.read_parquet(tiny_project.raw_corpus)
    assert c["id"].tolist() == ["0", "1", "2", f"{d / 'c2.jsonl'}#1"] and c["text"].tolist()[0] == "corpus 0"


def test_a_glob_that_matches_nothing_is_one_line(tiny_project, tmp_path):
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    msg = _ingest_error(tiny_project, tmp_path / "nope" / "*.jsonl", labeled)
    assert msg == f"{tmp_path / 'nope' / '*.jsonl'}: no files match this pattern"


def test_a_missing_configured_text_column_names_file_and_columns(tiny_project, tmp_path):
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": "doc"}])
    msg = _ingest_error(tiny_project, corpus, labeled, text_column="content")
    assert msg == f"{labeled}: missing column(s) ['content'] (has ['text', 'label'])"


def test_utf16_with_a_bom_is_decoded_and_latin1_needs_the_encoding(tiny_project, tmp_path):
    labeled = tmp_path / "labeled.csv"
    labeled.write_bytes(("text,label\n" + "".join(f"café {i},{'ab'[i % 2]}\n" for i in range(20))).encode("utf-16"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes("naïve résumé".encode("latin-1"))
    msg = _ingest_error(tiny_project, corpus, labeled)
    assert msg == (
        f"{corpus}: line 1: not UTF-8 (byte 0xef at offset 2); "
        "save the file as UTF-8 or set ingest.encoding (e.g. latin-1)"
    )
    ingest.run(_cfg(corpus=str(corpus), labeled=str(labeled), encoding="latin-1"), tiny_project)
    assert pd.read_parquet(tiny_project.raw_corpus)["text"].tolist() == ["naïve résumé"]
    assert "café 3" in set(pd.read_parquet(tiny_project.raw_labeled)["text"])


def test_a_binary_file_is_named(tiny_project, tmp_path):
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    corpus = tmp_path / "model.txt"
    corpus.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00")
    assert (
        _ingest_error(tiny_project, corpus, labeled)
        == f"{corpus}: line 1: a NUL byte at offset 7: a binary file, not text"
    )


def test_a_50_mb_line_without_newline_is_refused_with_bounded_memory(tiny_project, tmp_path):
    import tracemalloc

    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    corpus = tmp_path / "huge.jsonl"
    with corpus.open("wb") as f:
        f.write(b'{"text": "')
        for _ in range(50):
            f.write(b"x" * (1 << 20))
    tracemalloc.start()
    try:
        msg = _ingest_error(tiny_project, corpus, labeled)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg.startswith(f"{corpus}: line 1: longer than 16 MB with no line break (ingest.max_record_mb")
    assert peak < 40 * (1 << 20)  # the 16 MB it read and one copy at most: never the whole 50 MB line


def test_the_user_corpus_streams_in_bounded_chunks(tiny_project, tmp_path):
    """A corpus bigger than one chunk is written chunk by chunk, in order, with nothing lost."""
    labeled = _jsonl(tmp_path / "labeled.jsonl", _labeled_rows())
    corpus = _jsonl(tmp_path / "corpus.jsonl", [{"text": f"document {i}"} for i in range(20000)])
    res = ingest.run(_cfg(corpus=corpus, labeled=labeled), tiny_project)
    import pyarrow.parquet as pq

    f = pq.ParquetFile(tiny_project.raw_corpus)
    assert res.corpus_rows == 20000 and f.metadata.num_row_groups >= 3  # 8192-row chunks
    assert f.read().column("text").to_pylist() == [f"document {i}" for i in range(20000)]
