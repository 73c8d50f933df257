"""Behavioral-test machinery: perturbations keep meaning (and parseability), reports count what they should."""

from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import random
import re
import tokenize
from pathlib import Path

import pytest
import yaml

from tasks.shared.behavior import INVARIANCE, blank_lines, load_mft, rename_identifiers, run_behavioral, whitespace
from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

CODE = '''@functools.cache
def load_tests(loader, tests, pattern=None):
    """Load the tests of this package.

    Uses  the loader's discover() method.
    """
    import os.path
    this_dir = os.path.dirname(__file__)
    found = [t for t in tests if t.id()]
    total = len(found) + \\
        1
    try:
        names = sorted(str(t) for t in found)
    except (KeyError,
            ValueError) as exc:
        raise RuntimeError("cannot sort: %s" % exc)
    def keep(case, *extra, strict=False, **options):
        return case not in names
    return loader.discover(start_dir=this_dir, pattern=pattern, top_level_dir=None, total=total)'''

CLASS = '''class Spooler(Base):
    """Collects  items before they are flushed."""
    limit = 10

    async def flush(self, sink):
        pending, self.items = self.items, []
        async with sink.lock as guard:
            for item in pending:
                await sink.write(item, guard=guard)
        return f"{len(pending)} items"'''

PROSE = "Return the number of items.\n\nThe count includes  hidden ones."
SNIPPETS = [CODE, CLASS, "def f(x):\n    return x + 1", "x = 1", "def g(a, b):\n\tif a:\n\t\treturn b\n\treturn a"]


def _names(text: str) -> list[str]:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.NAME]


def _bindings(text: str) -> list[str]:
    """Every variable, parameter, def and class name, in tree order."""
    out = []
    for n in ast.walk(ast.parse(text)):
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.arg):
            out.append(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler)) and n.name:
            out.append(n.name)
    return out


class _BlankStrings(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant("") if isinstance(node.value, str) else node


def _shape(text: str) -> str:
    """The parsed program with names and string contents blanked: what layout and renaming must not change."""
    tree = _BlankStrings().visit(ast.parse(text))
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            n.id = "_"
        elif isinstance(n, ast.arg):
            n.arg = "_"
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler)) and n.name:
            n.name = "_"
    return ast.dump(tree)


def _attributes(text: str) -> set[str]:
    tree = ast.parse(text)
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
        n.arg for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg
    }


@pytest.mark.parametrize("name", sorted(INVARIANCE))
@pytest.mark.parametrize("text", [CODE, CLASS, PROSE])
def test_perturbations_are_deterministic_for_a_seed(name, text):
    perturb = INVARIANCE[name]
    assert len({perturb(text, random.Random(7)) for _ in range(3)}) == 1
    outputs = {perturb(text, random.Random(seed)) for seed in range(10)}
    if name == "rename_identifiers" and text == PROSE:
        assert outputs == {PROSE}  # not Python: not applicable
    else:
        assert len(outputs) > 1  # the seed matters


@pytest.mark.parametrize("name", sorted(INVARIANCE))
@pytest.mark.parametrize("text", SNIPPETS)
def test_perturbations_change_code_and_keep_it_parseable(name, text):
    for seed in range(40):
        out = INVARIANCE[name](text, random.Random(seed))
        if name == "rename_identifiers" and text == "x = 1":
            assert out == text  # a module-level name is not local: not applicable
        else:
            assert out != text
        assert _shape(out) == _shape(text)


@pytest.mark.parametrize("text", [PROSE, "a b", "one\ntwo", "  indented line"])
def test_whitespace_and_blank_lines_change_any_text_with_whitespace(text):
    for seed in range(20):
        assert whitespace(text, random.Random(seed)) != text
        assert blank_lines(text, random.Random(seed)) != text
    assert whitespace("nospace", random.Random(0)) == "nospace"


def test_whitespace_changes_only_layout():
    for text in SNIPPETS:
        for seed in range(20):
            out = whitespace(text, random.Random(seed))
            assert out.split() == text.split()  # the same words in the same order
            strings = [
                t.string for t in tokenize.generate_tokens(io.StringIO(out).readline) if t.type == tokenize.STRING
            ]
            assert '"cannot sort: %s"' in strings or text != CODE  # single-quoted literals are data: untouched


def test_whitespace_reindents_consistently():
    widths = set()
    for seed in range(40):
        out = whitespace(CODE, random.Random(seed))
        indents = {len(line) - len(line.lstrip(" ")) for line in out.split("\n") if line.strip()}
        widths.add(min(indents - {0}))
    assert {2, 4, 8} <= widths


def test_whitespace_never_adds_spaces_after_a_line_continuation():
    for seed in range(40):
        out = whitespace(CODE, random.Random(seed))
        assert sum(line.endswith("\\") for line in out.split("\n")) == 1


def test_blank_lines_only_inserts_empty_lines():
    for seed in range(20):
        out = blank_lines(CODE, random.Random(seed))
        assert [line for line in out.split("\n") if line] == [line for line in CODE.split("\n") if line]
        assert out.count("\n") > CODE.count("\n")
        assert "\\\n\n" not in out


def test_rename_is_consistent_and_never_touches_keywords_builtins_attributes_or_imports():
    reserved = set(keyword.kwlist) | set(keyword.softkwlist) | set(dir(builtins))
    reserved |= {
        "self",
        "cls",
        "os",
        "functools",
        "load_tests",
        "Spooler",
        "limit",
        "flush",
    }  # imported, module- or class-level
    for text in (CODE, CLASS):
        kept = _attributes(text)
        renamed_any = set()
        for seed in range(40):
            out = rename_identifiers(text, random.Random(seed))
            ast.parse(out)
            assert _attributes(out) == kept  # attribute and keyword-argument names untouched
            before, after = _bindings(text), _bindings(out)
            assert len(before) == len(after)
            mapping: dict[str, str] = {}
            for a, b in zip(before, after):
                assert mapping.setdefault(a, b) == b  # the same name always gets the same new name
                if a != b:
                    assert a not in reserved and re.fullmatch(r"var_\d+", b)
                    renamed_any.add(a)
            assert len(set(mapping.values())) == len(mapping)  # no two names merged
        assert renamed_any
    renamed = _renamed_somewhere(CODE)
    assert {
        "loader",
        "tests",
        "pattern",
        "this_dir",
        "found",
        "total",
        "names",
        "exc",
        "keep",
        "extra",
        "strict",
        "options",
    } <= renamed
    assert "case" not in renamed  # a soft keyword


def _renamed_somewhere(text: str) -> set[str]:
    names = set()
    for seed in range(60):
        out = rename_identifiers(text, random.Random(seed))
        names |= {a for a, b in zip(_bindings(text), _bindings(out)) if a != b}
    return names


def test_rename_leaves_fstring_names_and_prose_alone():
    assert "pending" not in _renamed_somewhere(CLASS)  # used inside an f-string: renaming would split it
    assert {"sink", "item", "guard"} <= _renamed_somewhere(CLASS)
    assert rename_identifiers(PROSE, random.Random(0)) == PROSE
    assert rename_identifiers("    def f(x):\n        return x", random.Random(0)).startswith(
        "    def f(x)"
    )  # does not parse: n/a


def test_rename_picks_names_not_already_in_the_text():
    text = "def f(a):\n    var_1 = a\n    return var_1"
    for seed in range(10):
        out = rename_identifiers(text, random.Random(seed))
        ast.parse(out)
        assert len(set(_names(out))) == len(set(_names(text)))


def _keyword_rule(texts: list[str]) -> list[str]:
    return [
        "asyncio" if "async" in t or "await" in t else "email" if "header" in t.lower() else "tkinter" for t in texts
    ]


TEXTS = [CODE, CLASS, PROSE, "def f(msg):\n    return msg.get_header()", "async def g(q):\n    await q.get()"] * 4


def test_an_invariant_predictor_passes_every_test():
    calls = []

    def predict(texts):
        calls.append(len(texts))
        return _keyword_rule(texts)

    report = run_behavioral(predict, TEXTS, load_mft(ROOT / "data/behavioral/mft.jsonl"), sample=12, seed=0)
    json.dumps(report)
    assert set(report["invariance"]) == set(INVARIANCE)
    for name, result in report["invariance"].items():
        assert result["pass_rate"] == 1.0 and result["failures"] == [], name
        assert result["n"] + result["not_applicable"] == 12
    assert (
        report["invariance"]["whitespace"]["n"] == 12
        and report["invariance"]["rename_identifiers"]["not_applicable"] >= 1
    )
    assert len(calls) == 1 + len(INVARIANCE) + 1  # batched: once for the sample, once a test, once for the MFT
    assert report["min_pass_rate"] == report["mft"]["pass_rate"] < 1.0
    assert run_behavioral(predict, TEXTS, None, sample=12, seed=0)["min_pass_rate"] == 1.0


def test_a_predictor_that_looks_at_whitespace_fails_the_layout_tests():
    def predict(texts):
        return ["tkinter" if (t.count(" ") + t.count("\n")) % 2 else "email" for t in texts]  # layout decides

    report = run_behavioral(predict, [CODE, CLASS, "def f(x):\n    return x"] * 5, [], sample=15, seed=1)
    assert report["invariance"]["whitespace"]["pass_rate"] < 1.0
    assert report["invariance"]["blank_lines"]["pass_rate"] < 1.0
    assert report["invariance"]["rename_identifiers"]["pass_rate"] == 1.0
    failure = report["invariance"]["whitespace"]["failures"][0]
    assert failure["expected"] == "email" and failure["predicted"] == "tkinter" and len(failure["text"]) <= 120
    assert len(report["invariance"]["blank_lines"]["failures"]) <= 3
    assert report["mft"] == {"pass_rate": None, "n": 0, "unknown_label": 0, "per_label": {}, "failures": []}
    assert report["min_pass_rate"] == min(r["pass_rate"] for r in report["invariance"].values())


def test_run_behavioral_is_seeded():
    def predict(texts):
        return ["a" if len(t) % 2 else "b" for t in texts]

    texts = [f"def f{k}(x):\n    return x + {k}" for k in range(50)]
    assert run_behavioral(predict, texts, [], sample=20, seed=3) == run_behavioral(
        predict, texts, [], sample=20, seed=3
    )
    assert run_behavioral(predict, texts, [], sample=20, seed=3) != run_behavioral(
        predict, texts, [], sample=20, seed=4
    )
    with pytest.raises(UserError, match="sample"):
        run_behavioral(predict, texts, [], sample=0, seed=3)


def test_mft_rates_per_label_and_unknown_labels():
    mft = [
        {"text": "async def f(): await g()", "label": "asyncio"},
        {"text": "await x", "label": "asyncio"},
        {"text": "plain", "label": "asyncio"},
        {"text": "the Subject header", "label": "email"},
        {"text": "a widget", "label": "tkinter"},
        {"text": "a socket", "label": "socket"},
        {"text": "another socket", "label": "socket"},
    ]
    report = run_behavioral(_keyword_rule, ["x = 1"], mft, sample=5, seed=0, labels=["asyncio", "email", "tkinter"])[
        "mft"
    ]
    assert report["n"] == 5 and report["unknown_label"] == 2
    assert report["pass_rate"] == pytest.approx(4 / 5)
    assert report["per_label"] == {
        "asyncio": {"pass_rate": pytest.approx(2 / 3), "n": 3},
        "email": {"pass_rate": 1.0, "n": 1},
        "tkinter": {"pass_rate": 1.0, "n": 1},
    }
    assert report["failures"] == [{"text": "plain", "expected": "asyncio", "predicted": "tkinter"}]
    assert run_behavioral(_keyword_rule, ["x = 1"], mft, sample=5, seed=0)["mft"]["unknown_label"] == 0


def test_predict_returning_the_wrong_number_of_labels_is_an_error():
    with pytest.raises(ValueError, match="2 labels for 1 texts"):
        run_behavioral(lambda texts: ["a", "b"], ["x = 1"], [], sample=1, seed=0)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ('["text", "label"]', "expected a JSON object"),
        ('{"text": "x"}', "'label' must be a non-empty string"),
        ('{"text": 3, "label": "email"}', "'text' must be a non-empty string"),
    ],
)
def test_a_malformed_mft_line_is_one_error_naming_file_and_line(tmp_path, line, message):
    file = tmp_path / "mft.jsonl"
    file.write_text('{"text": "a", "label": "email"}\n\n' + line + "\n")
    with pytest.raises(UserError, match=re.escape(f"{file}:3: {message}")):
        load_mft(file)


def test_missing_or_empty_mft_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such MFT file"):
        load_mft(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="no MFT examples"):
        load_mft(tmp_path / "empty.jsonl")


def test_shipped_mft_covers_every_default_label():
    examples = load_mft(ROOT / "data/behavioral/mft.jsonl")
    labels = yaml.safe_load((ROOT / "params.yaml").read_text())["ingest"]["packages"]
    counts = {label: sum(ex["label"] == label for ex in examples) for label in labels}
    assert all(n >= 3 for n in counts.values()), counts
    assert {ex["label"] for ex in examples} <= set(labels)
    for ex in examples:
        ast.parse(ex["text"])
