"""align: the AST pairs ingest writes, your pairs and documents, and align_data's queries, dedup and checks."""

from __future__ import annotations

import ast
import json

import pandas as pd
import pytest

from tasks import ingest
from tasks.align import data
from tasks.align.records import PAIR_COLUMNS, function_pairs, module_name, pair_frame, read_items, read_pairs
from tasks.shared.config.align_data import AlignDataConfig
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.errors import UserError

SOURCE = '''"""Module doc."""

import functools


def top(a, b):
    """Add two numbers.

    More words.
    """
    def inner():
        """Inner doc."""
        return a
    return a + b


class Thing:
    """A thing."""

    @functools.cache
    @staticmethod
    def cached():
        return 1

    async def fetch(self, url):
        """Fetch a url; say “ünïcode”."""
        return url

    def short(self): "One line."; return 2

    def only_doc(self):
        """Nothing else."""

    class Inner:
        def deep(self):
            return [lambda: 1]


if True:
    def conditional():
        return 3
'''


FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


@pytest.fixture(scope="module")
def pairs() -> dict[str, dict]:
    rows = function_pairs(ast.parse(SOURCE), SOURCE, "pkg/mod.py")
    return {r["qualname"]: r for r in rows}


def test_every_function_nested_ones_too_with_its_qualname_line_and_id(pairs):
    assert list(pairs) == [
        "pkg.mod.top",
        "pkg.mod.top.<locals>.inner",
        "pkg.mod.Thing.cached",
        "pkg.mod.Thing.fetch",
        "pkg.mod.Thing.short",
        "pkg.mod.Thing.only_doc",
        "pkg.mod.Thing.Inner.deep",
        "pkg.mod.conditional",
    ]
    top = pairs["pkg.mod.top"]
    assert (top["line"], top["id"], top["module"], top["source"]) == (6, "pkg/mod.py:6", "pkg.mod", "pkg/mod.py")
    assert pairs["pkg.mod.Thing.cached"]["line"] == 22  # the def line, not the decorator's


def test_the_docstring_is_the_text_and_leaves_the_code(pairs):
    top = pairs["pkg.mod.top"]
    assert top["text"] == "Add two numbers.\n\nMore words."
    assert top["code"] == (
        'def top(a, b):\n    def inner():\n        """Inner doc."""\n        return a\n    return a + b'
    )  # the nested function keeps its own docstring inside the parent's code
    inner = pairs["pkg.mod.top.<locals>.inner"]
    assert (inner["text"], inner["code"]) == ("Inner doc.", "def inner():\n    return a")
    fetch = pairs["pkg.mod.Thing.fetch"]  # async, dedented, a non-ASCII docstring cut at the right column
    assert fetch["text"] == "Fetch a url; say “ünïcode”."
    assert fetch["code"] == "async def fetch(self, url):\n    return url"
    assert pairs["pkg.mod.Thing.short"]["code"] == "def short(self): return 2"  # code sharing the docstring's line
    assert pairs["pkg.mod.Thing.only_doc"]["code"] == "def only_doc(self):"
    for name in ("pkg.mod.Thing.cached", "pkg.mod.Thing.Inner.deep", "pkg.mod.conditional"):
        assert pairs[name]["text"] == ""


def test_decorators_stay_with_the_code(pairs):
    assert pairs["pkg.mod.Thing.cached"]["code"] == "@functools.cache\n@staticmethod\ndef cached():\n    return 1"


def test_the_docstrings_keep_ast_walks_order():
    tree = ast.parse(SOURCE)
    walked = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, *FUNCS))]
    assert ingest.docstrings(tree) == [d for d in walked if d]


@pytest.mark.parametrize(
    ("path", "module"),
    [("asyncio/futures.py", "asyncio.futures"), ("email/__init__.py", "email"), ("os.py", "os")],
)
def test_module_name_from_the_path(path, module):
    assert module_name(path) == module


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("Return the value.  More.", "Return the value."),
        ("Return a dict, e.g. {'a': 1}. Then more.", "Return a dict, e.g. {'a': 1}."),
        ("Spans\n  two lines. Second.", "Spans two lines."),
        ("No sentence end\n\nSecond paragraph.", "No sentence end"),
        ("Is it? Yes.", "Is it?"),
        ("Version 3.11 and up.", "Version 3.11 and up."),
    ],
)
def test_first_sentence(text, query):
    assert data.make_query(text, "first_sentence") == query


def test_docstring_query_is_the_whole_text_collapsed():
    assert data.make_query("One.\n\n  Two.", "docstring") == "One. Two."


def _row(i: str, split: str, code: str, text: str = "doc.", source: str = "") -> dict:
    return {
        "id": i,
        "text": text,
        "code": code,
        "qualname": f"m.{i}",
        "module": "m",
        "source": source or f"{i}.py",
        "line": 1,
        "split": split,
    }


def _build(rows: list[dict], **cfg):
    counts = data.Counts()
    kept = data.deduplicate(data.prepare(pair_frame(rows), AlignDataConfig(**cfg), counts), counts)
    pairs, items = data.split_tables(kept)
    return pairs, items, counts


def test_duplicates_across_splits_leave_train_and_twins_keep_the_first():
    rows = [
        _row("a", "train", "def f():\n    return 1"),
        _row("b", "test", "def f():  return 1"),  # the same code once whitespace is collapsed
        _row("c", "test", "def f(): return 1", source="z.py"),  # a twin within test: the first (by source) stays
        _row("d", "test", "def g(): return 2", text=""),  # no text: an item, not a pair...
        _row("e", "test", "def g(): return 2", source="0.py"),  # ...its twin with a text wins although later
        _row("f", "train", "def h(): pass"),
        _row("g", "val", "def k(): pass"),
        _row("h", "index", "a document", text=""),
    ]
    pairs, items, counts = _build(rows)
    assert sorted(pairs["id"]) == ["b", "e", "f", "g"]
    assert sorted(items["id"]) == ["b", "e", "f", "g", "h"]
    assert counts.duplicates_dropped_from_train == 1
    assert counts.duplicates_within_split == {"train": 0, "val": 0, "test": 1, "index": 0}
    assert counts.items_duplicates_dropped == 3
    assert set(items.loc[items["id"] == "h", "split"]) == {"index"}
    assert items.set_index("id").loc["e", "snippet"] == "def g(): return 2"


def test_short_code_is_dropped_and_long_sides_are_cut():
    rows = [_row("a", "train", "x"), _row("b", "val", "def f(): pass", text="Long text. " * 10)]
    pairs, items, counts = _build(rows, min_code_chars=5, max_text_chars=20, max_code_chars=8)
    assert counts.short_code == 1 and counts.texts_cut == 1 and counts.codes_cut == 1
    assert pairs.iloc[0]["text"] == "Long text. Long text" and pairs.iloc[0]["code"] == "def f():"


def test_snippet_is_the_first_non_empty_line_cut():
    assert data.snippet("\n\n  def f(a):\n    return a") == "def f(a):"
    assert len(data.snippet("x" * 500)) == 200


def test_an_empty_split_is_one_line_naming_the_input(tmp_path):
    pairs, _, _ = _build([_row("a", "train", "def f(): pass"), _row("b", "test", "def g(): pass")])
    with pytest.raises(UserError, match=r"raw\.parquet: the val split has no pairs"):
        data.check_splits(pairs, tmp_path / "raw.parquet")


# --- your pairs and documents, through ingest ---------------------------------------------------------


def _jsonl(path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _user_cfg(tmp_path, pairs: str, **kw) -> IngestConfig:
    labeled = [{"text": f"t {i}", "label": "ab"[i % 2], "source": f"s{i % 10}"} for i in range(40)]
    return IngestConfig(
        corpus=_jsonl(tmp_path / "corpus.jsonl", [{"text": "a document"}]),
        labeled=_jsonl(tmp_path / "labeled.jsonl", labeled),
        pairs=pairs,
        min_examples_per_label=1,
        **kw,
    )


def test_your_pairs_with_your_columns_split_by_source(tiny_project, tmp_path):
    rows = [
        {"question": f"How to do {i}?", "answer": f"do({i})", "key": f"k{i}", "source": f"f{i % 10}", "group": "g"}
        for i in range(40)
    ]
    cfg = _user_cfg(
        tmp_path,
        _jsonl(tmp_path / "pairs.jsonl", rows),
        pair_columns={"text": "question", "code": "answer"},
        id_column="key",
    )
    result = ingest.run(cfg, tiny_project)
    raw = pd.read_parquet(tiny_project.raw_pairs)
    assert list(raw.columns) == PAIR_COLUMNS and str(raw["line"].dtype) == "int64"
    assert raw.set_index("id").loc["k3", ["text", "code", "qualname", "module", "source", "line"]].tolist() == [
        "How to do 3?",
        "do(3)",
        "k3",
        "g",
        "f3",
        4,
    ]
    assert raw.groupby("source")["split"].nunique().max() == 1  # a source lies in one split
    assert set(raw["split"]) == {"train", "val", "test"}
    assert sum(result.pair_rows.values()) == 40


def test_one_file_of_pairs_is_split_by_row_and_documents_are_indexed(tiny_project, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"text_a": f"Doc {i}.", "text_b": f"f({i})"} for i in range(40)])
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": "searchable text", "source": "manual"}])
    ingest.run(_user_cfg(tmp_path, pairs, documents=docs), tiny_project)
    raw = pd.read_parquet(tiny_project.raw_pairs).set_index("id")
    assert set(raw["split"]) == {"train", "val", "test", "index"}
    assert raw.loc[f"{pairs}#1", "module"] == pairs  # no group, no source: the file
    doc = raw.loc[f"{docs}#1"]
    assert (doc["text"], doc["code"], doc["split"], doc["module"]) == ("", "searchable text", "index", "manual")


BAD_PAIRS = [
    pytest.param(
        [{"text_a": "a", "text_b": "b"}, {"text_a": " ", "text_b": "c"}],
        "row 2: text_a is missing or blank (every pair needs both sides; fix or remove the row)",
        id="blank-text",
    ),
    pytest.param(
        [{"text_a": "a", "text_b": "b"}, {"text_a": "x"}, {"text_a": "y", "text_b": None}],
        "row 2: text_b is missing or blank (every pair needs it; fix or remove the row) (and 1 more: {f}: row 3)",
        id="missing-code",
    ),
    pytest.param(
        [{"text_a": "a", "text_b": 3}],
        "row 1: text_b is int 3, not a string",
        id="int-code",
    ),
    pytest.param(
        [{"text_a": "a", "text_b": "b", "id": "x"}, {"text_a": "c", "text_b": "d", "id": "x"}],
        "row 2: id 'x' is not unique",
        id="duplicate-id",
    ),
    pytest.param([{"text": "a", "code": "b"}], "missing column(s) ['text_a', 'text_b'] (has", id="missing-columns"),
]


@pytest.mark.parametrize(("rows", "error"), BAD_PAIRS)
def test_bad_pair_rows_are_one_line_errors_naming_file_and_row(tiny_project, tmp_path, rows, error):
    f = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserError) as e:
        ingest.run(_user_cfg(tmp_path, f), tiny_project)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}: " + error.replace("{f}", f)), msg
    assert not tiny_project.raw_pairs.exists()


def test_a_blank_document_names_its_row(tiny_project, tmp_path):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"text_a": f"Doc {i}.", "text_b": f"f({i})"} for i in range(10)])
    docs = _jsonl(tmp_path / "docs.jsonl", [{"text": "ok"}, {"text": ""}])
    with pytest.raises(UserError, match=rf"^{docs}: row 2: text is missing or blank \(every document needs it"):
        ingest.run(_user_cfg(tmp_path, pairs, documents=docs), tiny_project)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"pairs": []}, "pairs: a list names your files"),
        ({"documents": "stdlib"}, "documents: name your files"),
        ({"pair_columns": {"text": "q"}}, "pair_columns: give exactly `text` and `code`"),
        ({"pair_columns": {"text": "id", "code": "c"}}, "the text, code and id columns must be three different"),
    ],
)
def test_pair_settings_are_checked(kw, error):
    with pytest.raises(ValueError, match=error):
        IngestConfig(**kw)


# --- the checkpoint and the stage's outputs ------------------------------------------------------------


def test_the_stage_writes_checked_pairs_and_items_and_the_suite_names_a_bad_row(tiny_project):
    rows = [_row(f"{s}{i}", s, f"def f_{s}{i}(): pass") for s in ("train", "val", "test") for i in range(3)]
    tiny_project.raw_pairs.parent.mkdir(parents=True, exist_ok=True)
    pair_frame(rows).to_parquet(tiny_project.raw_pairs, index=False)
    result = data.run(AlignDataConfig(), tiny_project)
    assert result.metrics["pairs_per_split"] == {"train": 3, "val": 3, "test": 3}
    assert result.metrics["validation_passed"] and result.metrics["expectations"] == 7
    assert read_pairs(tiny_project.align_data)["id"].tolist() == result.pairs["id"].tolist()
    assert len(read_items(tiny_project.align_data)) == 9
    validation = json.loads((tiny_project.align_data / data.VALIDATION).read_text())
    assert validation["success"] is True
    bad = result.pairs.copy()
    bad.loc[4, "id"] = bad.loc[3, "id"]
    with pytest.raises(UserError, match=r"^align data validation failed: align_pairs: expect_column_values_to_be_uniq"):
        data.validate_pairs(bad, AlignDataConfig(), tiny_project.gx)
