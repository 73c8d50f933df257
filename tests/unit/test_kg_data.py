"""kg_data: the knowledge base, silver mentions and relation gold from the AST, user spans, splits, GE checks."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_paths

from tasks.kg import ast_facts, records
from tasks.kg import data as kg_data
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.config.kg_data import KgDataConfig
from tasks.shared.errors import UserError
from tasks.shared.io import ReadOptions

ROOT = Path(__file__).resolve().parents[2]

MODULES = {
    "pkg/__init__.py": '"""The pkg package."""\n',
    "pkg/message.py": '''
        """Messages."""


        class Message:
            """A message."""

            def get_payload(self, decode=False):
                """Return the payload, decoded if decode is true; see `as_string()`."""
                return self.as_string()

            def as_string(self):
                """Flatten the message."""
                return ""


        class MessageError(ValueError):
            """A bad message."""
        ''',
    "json/__init__.py": '''
        """JSON."""


        def loads(s):
            """Decode s."""
            return s
        ''',
    "pkg/parser.py": '''
        """Parse text into a pkg.message.Message."""

        import json
        import pkg.message as msgmod
        from .message import Message, MessageError


        def parse(text, strict=True):
            """Parse text with json.loads into a Message; raises MessageError.

            A frobnicate is not a mention; msgmod.Message names the same class, and ValueError is never raised.
            """
            if strict and not text:
                raise MessageError("empty")
            json.loads(text)
            return Message()


        class Parser(Message):
            """A Message subclass."""
        ''',
    "broken.py": "def broken(:\n",
}


def _rows(modules: dict[str, str] = MODULES) -> list[tuple[str, str]]:
    return [(source, textwrap.dedent(code).lstrip()) for source, code in modules.items()]


@pytest.fixture(scope="module")
def built() -> tuple[records.KgTables, list[str]]:
    return ast_facts.build(_rows(), max_chars=512)


def _spans(tables: records.KgTables, doc_id: str) -> dict[str, tuple[str, str]]:
    """surface -> (label, link) of a doc's mentions."""
    text = tables.docs.set_index("id").loc[doc_id, "text"]
    m = tables.mentions[tables.mentions["doc_id"] == doc_id]
    return {text[s:e]: (label, link) for s, e, label, link in zip(m["start"], m["end"], m["label"], m["link"])}


def test_entities_are_the_definitions_and_builtins_and_unparsable_files_are_counted(built):
    tables, unparsable = built
    e = tables.entities.set_index("id")
    assert unparsable == ["broken.py"]
    assert e.loc["pkg.message.Message", "kind"] == "class"
    assert e.loc["pkg.message.MessageError", "kind"] == "exception"  # inherits a builtin exception
    assert e.loc["pkg.message.Message.get_payload", ["kind", "signature"]].tolist() == [
        "method",
        "(self, decode=False)",
    ]
    assert e.loc["pkg.parser", ["kind", "module", "source"]].tolist() == ["module", "pkg.parser", "pkg/parser.py"]
    assert e.loc["pkg", "doc"] == "The pkg package."
    assert e.loc["builtins.ValueError", ["kind", "module", "source"]].tolist() == ["exception", "builtins", ""]
    assert list(tables.entities.columns) == records.ENTITY_COLUMNS
    assert tables.entities["id"].is_monotonic_increasing and tables.entities["id"].is_unique


def test_mentions_resolve_imports_module_qualified_names_parameters_and_builtins(built):
    tables, _ = built
    spans = _spans(tables, "pkg/parser.py#pkg.parser.parse")
    assert spans["text"] == ("parameter", "")
    assert spans["Message"] == ("class", "pkg.message.Message")  # `from .message import Message`
    assert spans["json.loads"] == ("function", "json.loads")  # module-qualified
    assert spans["msgmod.Message"] == ("class", "pkg.message.Message")  # `import pkg.message as msgmod`
    assert spans["MessageError"] == ("exception", "pkg.message.MessageError")
    assert spans["ValueError"] == ("exception", "builtins.ValueError")
    assert "frobnicate" not in spans and "Parse" not in spans and "A" not in spans
    assert _spans(tables, "pkg/parser.py#pkg.parser")["pkg.message.Message"] == ("class", "pkg.message.Message")
    method = _spans(tables, "pkg/message.py#pkg.message.Message.get_payload")
    assert method["decode"] == ("parameter", "") and method["as_string"] == (
        "function",
        "pkg.message.Message.as_string",
    )
    assert "self" not in method


def test_relation_gold_is_what_the_ast_says(built):
    tables, _ = built
    text = dict(zip(tables.docs["id"], tables.docs["text"]))
    m = tables.mentions.set_index(["doc_id", "m"])
    gold = {}
    for doc_id, head, tail, label in tables.relations.itertuples(index=False):
        start, end = m.loc[(doc_id, tail), ["start", "end"]]
        assert head == records.OWNER
        gold[(doc_id.split("#")[1], text[doc_id][start:end])] = label
    parse = "pkg.parser.parse"
    assert gold[(parse, "MessageError")] == "raises"
    assert gold[(parse, "Message")] == "returns" and gold[(parse, "msgmod.Message")] == "returns"
    assert gold[(parse, "json.loads")] == "calls"
    assert gold[(parse, "ValueError")] == "none"
    assert gold[("pkg.parser.Parser", "Message")] == "inherits"
    assert ("pkg.message.Message.get_payload", "decode") not in gold  # parameters are no relation candidates
    assert gold[("pkg.message.Message.get_payload", "as_string")] == "calls"  # self.as_string()
    facts = set(tables.facts.itertuples(index=False, name=None))
    assert {
        (parse, "raises", "pkg.message.MessageError"),
        (parse, "returns", "pkg.message.Message"),
        (parse, "calls", "json.loads"),
        ("pkg.parser.Parser", "inherits", "pkg.message.Message"),
        ("pkg.message.MessageError", "inherits", "builtins.ValueError"),
    } <= facts


def _real_tables(n_files: int = 40) -> records.KgTables:
    from tasks.ingest import stdlib_files, stdlib_root

    root = stdlib_root()
    files = [f for f in stdlib_files(root) if f.relative_to(root).parts[0] in ("email", "json", "logging")][:n_files]
    tables, _ = ast_facts.build([(str(f.relative_to(root)), f.read_text(encoding="utf-8")) for f in files], 512)
    return tables


def test_no_two_mentions_of_a_doc_overlap_and_mentions_are_numbered_by_start():
    tables = _real_tables()
    assert len(tables.mentions) > 100
    for _, m in tables.mentions.groupby("doc_id"):
        assert m["m"].tolist() == list(range(len(m)))
        assert (m["start"].to_numpy()[1:] >= m["end"].to_numpy()[:-1]).all()
        assert (m["start"] < m["end"]).all()
    assert set(tables.mentions["label"]) <= set(records.ENTITY_LABELS)
    assert set(tables.relations["label"]) <= {*records.RELATIONS, records.NONE}


def test_split_by_file_keeps_known_files_and_never_splits_a_file():
    docs = pd.DataFrame(
        {"id": [f"f{i % 20}.py#d{i}" for i in range(100)], "source": [f"f{i % 20}.py" for i in range(100)]}
    )
    split = kg_data.split_by_file(docs, {"f0.py": "test", "f1.py": "val"}, IngestConfig())
    by_file = docs.assign(split=split).groupby("source")["split"].nunique()
    assert (by_file == 1).all()
    assert set(split[docs["source"] == "f0.py"]) == {"test"} and set(split[docs["source"] == "f1.py"]) == {"val"}
    assert set(split) == {"train", "val", "test"}
    assert split.equals(kg_data.split_by_file(docs, {"f0.py": "test", "f1.py": "val"}, IngestConfig()))


GOOD_ROWS = [
    {
        "id": "a",
        "text": "Alice works for Acme.",
        "entities": [{"start": 16, "end": 20, "label": "ORG"}, {"start": 0, "end": 5, "label": "PER"}],
        "relations": [{"head": 1, "tail": 0, "label": "works_for"}],
    },
    {"id": "b", "text": "Bob met Carol.", "label": [[0, 3, "PER"], [8, 13, "PER"]]},  # Doccano, spans only
    {
        "id": "c",
        "text": "Dana joined Initech.",
        "entities": [
            {"id": 7, "start_offset": 0, "end_offset": 4, "label": "PER"},
            {"id": 9, "start_offset": 12, "end_offset": 19, "label": "ORG"},
        ],
        "relations": [{"id": 1, "from_id": 7, "to_id": 9, "type": "works_for"}],
    },  # Doccano's relation export
    {"id": "d", "text": "Nothing to see here.", "entities": []},
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_user_spans_good_rows_in_each_shape(tmp_path):
    raw = records.read_user_spans(str(_jsonl(tmp_path / "spans.jsonl", GOOD_ROWS)), ReadOptions())
    assert list(raw.columns) == records.RAW_COLUMNS
    rows = {r.id: r for r in raw.itertuples()}
    # entities sorted by start, relation ends renumbered with them
    assert json.loads(rows["a"].entities) == [
        {"start": 0, "end": 5, "label": "PER"},
        {"start": 16, "end": 20, "label": "ORG"},
    ]
    assert json.loads(rows["a"].relations) == [{"head": 0, "tail": 1, "label": "works_for"}]
    assert [e["label"] for e in json.loads(rows["b"].entities)] == ["PER", "PER"]
    assert json.loads(rows["c"].relations) == [{"head": 0, "tail": 1, "label": "works_for"}]
    assert json.loads(rows["d"].entities) == [] and rows["d"].source == str(tmp_path / "spans.jsonl")


BAD_ROWS = {
    "empty text": ({"text": "  ", "entities": []}, "text is missing or blank"),
    "missing text": ({"entities": []}, "text is missing or blank"),
    "no entities key": ({"text": "Hello."}, "no entities"),
    "out of range": (
        {"text": "Hi.", "entities": [{"start": 1, "end": 9, "label": "X"}]},
        "entities[0] [1, 9) is out of range",
    ),
    "negative start": ({"text": "Hi.", "entities": [{"start": -1, "end": 2, "label": "X"}]}, "is out of range"),
    "empty span": (
        {"text": "Hi there.", "entities": [{"start": 2, "end": 2, "label": "X"}]},
        "entities[0] [2, 2) is empty",
    ),
    "overlap": (
        {
            "text": "New York City",
            "entities": [{"start": 0, "end": 8, "label": "X"}, {"start": 4, "end": 13, "label": "Y"}],
        },
        "entities[0] [0, 8) and entities[1] [4, 13) overlap",
    ),
    "missing end": ({"text": "Hi.", "entities": [{"start": 0, "label": "X"}]}, "entities[0] has no end"),
    "string offset": ({"text": "Hi.", "entities": [{"start": "0", "end": 2, "label": "X"}]}, "must be integers"),
    "bad label": (
        {"text": "Hi.", "entities": [{"start": 0, "end": 2, "label": 3}]},
        "label must be a non-empty string",
    ),
    "entities not a list": ({"text": "Hi.", "entities": {"start": 0}}, "entities is dict, not a list"),
    "relation to a missing entity": (
        {
            "text": "Hi.",
            "entities": [{"start": 0, "end": 2, "label": "X"}],
            "relations": [{"head": 0, "tail": 1, "label": "r"}],
        },
        "relations[0]: tail 1 is not one of the row's entities",
    ),
    "relation without label": (
        {"text": "Hi.", "entities": [{"start": 0, "end": 2, "label": "X"}], "relations": [{"head": 0, "tail": 0}]},
        "relations[0] has no label",
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_user_row_is_one_line_naming_file_and_row(tmp_path, case):
    row, message = BAD_ROWS[case]
    f = _jsonl(tmp_path / "spans.jsonl", [GOOD_ROWS[0], row])
    with pytest.raises(UserError) as err:
        records.read_user_spans(str(f), ReadOptions())
    text = str(err.value)
    assert "\n" not in text and message in text
    assert text.startswith(f"{f}: row 2: ")


def test_duplicate_user_ids_are_an_error_naming_the_row(tmp_path):
    f = _jsonl(tmp_path / "spans.jsonl", [GOOD_ROWS[0], GOOD_ROWS[0]])
    with pytest.raises(UserError, match=r"spans.jsonl: row 2: id 'a' is not unique"):
        records.read_user_spans(str(f), ReadOptions())


@pytest.fixture
def project(tmp_path):
    """Paths under tmp_path with the real gx/ project, a clean corpus of MODULES and a labeled set naming one file."""
    paths = make_paths(tmp_path)
    shutil.copytree(ROOT / "gx", paths.gx, ignore=shutil.ignore_patterns("uncommitted"))
    Path(paths.clean_corpus).parent.mkdir(parents=True)
    rows = _rows() + [(f"extra/m{i}.py", f'"""Module {i} uses ValueError."""\n') for i in range(30)]
    corpus = pd.DataFrame({"id": [s for s, _ in rows], "text": [c for _, c in rows], "source": [s for s, _ in rows]})
    corpus.assign(kind="code").to_parquet(paths.clean_corpus, index=False)
    labeled = pd.DataFrame({"id": ["x"], "text": ["t"], "label": ["a"], "source": ["pkg/parser.py"], "split": ["test"]})
    labeled.to_parquet(paths.clean_labeled, index=False)
    return paths


def test_the_stage_writes_checked_tables_split_by_file(project):
    result = kg_data.run(KgDataConfig(min_docs=5), IngestConfig(), project)
    tables = records.read_tables(project.kg_data)
    assert result.validated > 0 and json.loads((Path(project.kg_data) / "validation.json").read_text())["success"]
    assert set(tables.docs.loc[tables.docs["source"] == "pkg/parser.py", "split"]) == {"test"}
    assert (tables.docs.groupby("source")["split"].nunique() == 1).all()
    assert {"train", "val", "test"} == set(tables.docs["split"])
    metrics = result.metrics
    assert metrics["unparsable_files"] == 1 and metrics["docs"] == len(tables.docs)
    assert sum(s["docs"] for s in metrics["per_split"].values()) == metrics["docs"]
    assert metrics["mentions_per_label"]["exception"] >= 30


def test_the_suites_fail_an_overlapping_span_in_one_line(project):
    tables, _ = ast_facts.build(_rows(), 512)
    tables.docs["split"] = "train"
    kg_data.validate_tables(tables, KgDataConfig(min_docs=1), project.gx, stdlib=True)  # the good tables pass
    m = tables.mentions
    first = m[m["doc_id"] == "pkg/parser.py#pkg.parser.parse"].index[:2]
    m.loc[first[1], "start"] = m.loc[first[0], "end"] - 1
    with pytest.raises(UserError) as err:
        kg_data.validate_tables(tables, KgDataConfig(min_docs=1), project.gx, stdlib=True)
    text = str(err.value)
    assert "\n" not in text
    assert "kg_mentions: expect_column_values_to_be_in_set(overlaps)" in text and "pkg.parser.parse#1" in text


def test_user_spans_become_the_tables_with_none_pairs(project, tmp_path):
    raw = records.read_user_spans(str(_jsonl(tmp_path / "spans.jsonl", GOOD_ROWS * 1)), ReadOptions())
    tables = kg_data.user_tables(raw, KgDataConfig(max_none_pairs=5), IngestConfig())
    r = tables.relations.set_index(["doc_id", "head", "tail"])["label"]
    assert r[("a", 0, 1)] == "works_for" and r[("a", 1, 0)] == "none"
    assert r[("b", 0, 1)] == "none" and ("d",) not in {k[:1] for k in r.index}
    assert (tables.mentions["link"] == "").all() and tables.entities.empty and tables.facts.empty
    assert set(tables.docs["split"]) <= {"train", "val", "test"}
    kg_data.validate_tables(tables, KgDataConfig(min_docs=1), project.gx, stdlib=False)
    records.write_raw(raw, project.kg_raw)  # what ingest writes; the stage reads it when ingest.spans names files
    result = kg_data.run(KgDataConfig(min_docs=1), IngestConfig(spans=str(tmp_path / "spans.jsonl")), project)
    assert result.metrics["docs"] == 4 and result.metrics["relations_per_label"]["works_for"] == 2
    assert records.read_tables(project.kg_data).docs["id"].tolist() == ["a", "b", "c", "d"]
