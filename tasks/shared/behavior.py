"""Behavioral tests of a text classifier in the spirit of CheckList (Ribeiro et al. 2020).

Two kinds of test, both black-box over `predict(list[str]) -> list[str]`:

- Invariance: a perturbation that does not change what a text means to a reader (whitespace,
  blank lines, renamed local variables) must not change the predicted label. Each perturbation is
  `fn(text, rng) -> str`, deterministic given the `random.Random`, and returns the text unchanged when
  it does not apply (such texts are counted as not applicable, never as passes).
- Minimum functionality (MFT): short hand-written examples whose label is obvious to a reader
  (`data/behavioral/mft.jsonl`, one `{"text": ..., "label": ...}` object a line).

Every perturbation keeps a text that parsed as Python (`ast.parse`) parseable.
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import keyword
import random
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tasks.shared.errors import UserError

Perturbation = Callable[[str, random.Random], str]
Predict = Callable[[list[str]], Sequence[str]]

FAILURE_EXAMPLES = 3
"""Failures kept per test in the report."""
FAILURE_CHARS = 120
"""Characters of a failing text kept in the report."""

_INDENT_UNIT = 4
_INDENT_WIDTHS = (2, 8)
_SPACE_P = 0.3
_TRAILING_P = 0.3
_BLANK_P = 0.25
_RENAME_P = 0.5
_REINDENT_P = 0.5
_NEVER_RENAMED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | {"self", "cls"}
_FUNCTION_SCOPES = ("function", "comprehension")


def _tokens(text: str) -> list[tokenize.TokenInfo] | None:
    """The text's Python tokens, or None when it does not tokenize as Python."""
    try:
        return list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return None


def _parses(text: str) -> bool:
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def _line_starts(text: str) -> list[int]:
    """Offset of the start of each line; index 0 is unused so that rows are 1-based like tokenize's."""
    starts = [0, 0]
    for line in text.split("\n")[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    return starts


def _is_triple_quoted(string_token: str) -> bool:
    body = string_token.lstrip("rRbBuUfF")
    return body.startswith('"""') or body.startswith("'''")


def _protected(text: str, tokens: list[tokenize.TokenInfo] | None) -> bytearray:
    """1 at each offset inside a single-quoted string literal, whose spaces are data rather than layout."""
    mask = bytearray(len(text))
    if tokens is None:
        return mask
    starts = _line_starts(text)
    fstring_start = getattr(tokenize, "FSTRING_START", None)  # Python >= 3.12 splits f-strings into parts
    opened: list[tokenize.TokenInfo] = []
    for t in tokens:
        if fstring_start is not None and t.type == fstring_start:
            opened.append(t)
            continue
        if fstring_start is not None and t.type == tokenize.FSTRING_END:
            first = opened.pop()
            if opened:
                continue
        elif t.type == tokenize.STRING and not opened:
            first = t
        else:
            continue
        if not _is_triple_quoted(first.string):
            a, b = starts[first.start[0]] + first.start[1], starts[t.end[0]] + t.end[1]
            mask[a:b] = b"\x01" * (b - a)
    return mask


def _reindent_widths(tokens: list[tokenize.TokenInfo] | None) -> tuple[int, ...]:
    """New indentation widths the text can take: none unless every block indent is a multiple of 4 spaces."""
    if tokens is None:
        return ()
    indents = [t.string for t in tokens if t.type == tokenize.INDENT]
    if not indents or any(s.strip(" ") or len(s) % _INDENT_UNIT for s in indents):
        return ()
    return _INDENT_WIDTHS


def _reindent(line: str, width: int) -> str:
    n = len(line) - len(line.lstrip(" "))
    return " " * ((n // _INDENT_UNIT) * width + n % _INDENT_UNIT) + line[n:]


def whitespace(text: str, rng: random.Random) -> str:
    """Change layout whitespace only: double some single spaces, add trailing spaces, maybe reindent.

    - A single space between two non-space characters, outside leading indentation and outside
      single-quoted string literals, becomes two (probability 0.3 each).
    - Some lines not ending in a backslash get 1-3 trailing spaces (probability 0.3 each).
    - With probability 0.5, when the text tokenizes as Python and every block indent is a multiple of
      4 spaces, all leading indentation is rescaled consistently to 2 or 8 spaces a level (n spaces
      become n // 4 * width + n % 4): block structure, and so parseability, is kept.

    A text with any whitespace comes back changed (one doubled or trailing space is forced), unless every
    line ends in a backslash and no single space separates two words.
    """
    if not any(c.isspace() for c in text):
        return text
    tokens = _tokens(text)
    protected = _protected(text, tokens)
    singles = [
        i
        for i in range(1, len(text) - 1)
        if text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace() and not protected[i]
    ]
    doubled = {i for i in singles if rng.random() < _SPACE_P}
    lines = text.split("\n")
    open_ended = [k for k, line in enumerate(lines) if not line.endswith("\\")]
    trailing = {k: rng.randint(1, 3) for k in open_ended if rng.random() < _TRAILING_P}
    widths = _reindent_widths(tokens)
    width = rng.choice(widths) if widths and rng.random() < _REINDENT_P else None
    if not doubled and not trailing and width is None:
        if singles:
            doubled = {rng.choice(singles)}
        elif open_ended:
            trailing = {rng.choice(open_ended): 1}
    out = "".join(c + " " if i in doubled else c for i, c in enumerate(text))
    lines = out.split("\n")
    if width is not None:
        lines = [_reindent(line, width) for line in lines]
    return "\n".join(line + " " * trailing.get(k, 0) for k, line in enumerate(lines))


def blank_lines(text: str, rng: random.Random) -> str:
    """Insert 1-2 empty lines at some line boundaries, the start and the end included (probability 0.25 each).

    Never after a line ending in a backslash (a continuation). At least one boundary gets blank lines,
    so the text always comes back changed.
    """
    lines = text.split("\n")
    gaps = [k for k in range(len(lines) + 1) if k == 0 or not lines[k - 1].endswith("\\")]
    chosen = {k for k in gaps if rng.random() < _BLANK_P} or {rng.choice(gaps)}
    out: list[str] = []
    for k in range(len(lines) + 1):
        if k in chosen:
            out.extend([""] * rng.randint(1, 2))
        if k < len(lines):
            out.append(lines[k])
    return "\n".join(out)


@dataclass
class _Scope:
    kind: str
    """module, class, function or comprehension."""
    parent: _Scope | None
    bound: set[str] = field(default_factory=set)


@dataclass
class _Use:
    name: str
    row: int
    col: int
    """UTF-8 byte column, as ast reports it."""
    scope: _Scope


class _Binder(ast.NodeVisitor):
    """Every occurrence of a plain name with the scope it is in, and the names bound in each scope.

    Def, class and `except ... as` names have no node of their own; their positions are looked up
    among the tokens (`named_after`: the (row, byte col) of a `def`/`class`/`except` keyword -> the
    position of the name it introduces).
    """

    def __init__(self, named_after: dict[tuple[int, int], tuple[int, int]]):
        self.named_after = named_after
        self.scope = _Scope("module", None)
        self.uses: list[_Use] = []
        self.excluded: set[str] = set()
        """Names never renamed: imported, declared global/nonlocal, bound by match patterns."""

    def _use(self, name: str, row: int, col: int, scope: _Scope | None = None) -> None:
        self.uses.append(_Use(name, row, col, scope or self.scope))

    def _bind_named(self, node: ast.AST, name: str) -> None:
        self.scope.bound.add(name)
        at = self.named_after.get((node.lineno, node.col_offset))
        if at is None:
            self.excluded.add(name)
        else:
            self._use(name, *at)

    def _enter(self, kind: str) -> _Scope:
        outer, self.scope = self.scope, _Scope(kind, self.scope)
        return outer

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.scope.bound.add(node.id)
        self._use(node.id, node.lineno, node.col_offset)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        scope = self.scope
        while scope.kind == "comprehension":  # a walrus in a comprehension binds in the enclosing scope
            scope = scope.parent
        scope.bound.add(node.target.id)
        self._use(node.target.id, node.target.lineno, node.target.col_offset, scope)
        self.visit(node.value)

    def _arguments(self, args: ast.arguments) -> None:
        for a in args.posonlyargs + args.args + [args.vararg] + args.kwonlyargs + [args.kwarg]:
            if a is not None:
                self.scope.bound.add(a.arg)
                self._use(a.arg, a.lineno, a.col_offset)

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
            self.visit(d)
        if not isinstance(node, ast.Lambda):
            for d in node.decorator_list:
                self.visit(d)
            for a in (
                node.args.posonlyargs + node.args.args + [node.args.vararg] + node.args.kwonlyargs + [node.args.kwarg]
            ):
                if a is not None and a.annotation is not None:
                    self.visit(a.annotation)
            if node.returns is not None:
                self.visit(node.returns)
            self._bind_named(node, node.name)
        outer = self._enter("function")
        self._arguments(node.args)
        for stmt in node.body if isinstance(node.body, list) else [node.body]:
            self.visit(stmt)
        self.scope = outer

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for n in node.decorator_list + node.bases + node.keywords:
            self.visit(n)
        self._bind_named(node, node.name)
        outer = self._enter("class")
        for stmt in node.body:
            self.visit(stmt)
        self.scope = outer

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp) -> None:
        self.visit(node.generators[0].iter)  # evaluated in the enclosing scope
        outer = self._enter("comprehension")
        for k, gen in enumerate(node.generators):
            self.visit(gen.target)
            if k:
                self.visit(gen.iter)
            for cond in gen.ifs:
                self.visit(cond)
        for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
            self.visit(part)
        self.scope = outer

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.type is not None:
            self.visit(node.type)
        if node.name is not None:
            self._bind_named(node, node.name)
        for stmt in node.body:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        self.excluded.update((a.asname or a.name).split(".")[0] for a in node.names)

    visit_ImportFrom = visit_Import

    def visit_Global(self, node: ast.Global | ast.Nonlocal) -> None:
        self.excluded.update(node.names)

    visit_Nonlocal = visit_Global

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self.excluded.add(node.name or "_")
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        self.excluded.add(node.name or "_")

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self.excluded.add(node.rest or "_")
        self.generic_visit(node)


def _resolves_to_function(use: _Use) -> bool:
    """Whether the name binds in a function (or comprehension) scope, following Python's scoping rules."""
    scope: _Scope | None = use.scope
    first = True
    while scope is not None:
        if (first or scope.kind != "class") and use.name in scope.bound:
            return scope.kind in _FUNCTION_SCOPES
        first = False
        scope = scope.parent
    return False


def _byte_col(line: str, col: int) -> int:
    return len(line[:col].encode("utf-8"))


def _named_after(tokens: list[tokenize.TokenInfo], lines: list[str]) -> dict[tuple[int, int], tuple[int, int]]:
    """(row, byte col) of each `def`, `async def`, `class` and `except ... as` keyword -> that of the name it binds.

    The keys are where ast puts the statement or handler node (a decorated def's node starts at its
    `def`, an async def's at `async`).
    """

    def at(t: tokenize.TokenInfo) -> tuple[int, int]:
        return t.start[0], _byte_col(lines[t.start[0] - 1], t.start[1])

    found = {}
    for k, t in enumerate(tokens):
        if t.type != tokenize.NAME or t.string not in ("def", "class", "except", "async"):
            continue
        rest = tokens[k + 1 :]
        if t.string == "async":
            if not rest or rest[0].string != "def":
                continue
            rest = rest[1:]
        elif t.string == "except":
            rest = next((rest[j + 1 :] for j, u in enumerate(rest) if u.type == tokenize.NAME and u.string == "as"), [])
        if rest and rest[0].type == tokenize.NAME:
            found[at(t)] = at(rest[0])
    return found


def rename_identifiers(text: str, rng: random.Random) -> str:
    """Consistently rename some function-local names (parameters, local variables, nested defs) to `var_1`, `var_2`, ...

    Applies to text that parses as Python; other text comes back unchanged (not applicable). Scopes are
    resolved with Python's rules (ast), positions come from the `tokenize` tokens. Never renamed:
    keywords, builtins, `self`/`cls`, dunder names, attributes after a dot, keyword-argument names,
    imported names, names declared global/nonlocal, module- and class-level names (the snippet's public
    interface), and any name also used where a token cannot be rewritten (inside an f-string).
    Each candidate is renamed with probability 0.5, at least one when there is any; a new name never
    clashes with a word already in the text. The result is checked to parse, else the text is returned.
    """
    if "\r" in text or not _parses(text):
        return text
    tokens = _tokens(text)
    if tokens is None:
        return text
    lines = text.split("\n")
    starts = _line_starts(text)
    name_at = {(t.start[0], _byte_col(lines[t.start[0] - 1], t.start[1])): t for t in tokens if t.type == tokenize.NAME}
    binder = _Binder(_named_after(tokens, lines))
    binder.visit(ast.parse(text))
    local = [u for u in binder.uses if _resolves_to_function(u)]
    unsafe = {u.name for u in local if (u.row, u.col) not in name_at or name_at[(u.row, u.col)].string != u.name}
    skip = _NEVER_RENAMED | binder.excluded | unsafe
    candidates = list(dict.fromkeys(u.name for u in sorted(local, key=lambda u: (u.row, u.col))))
    candidates = [n for n in candidates if n not in skip and not (n.startswith("__") and n.endswith("__"))]
    if not candidates:
        return text
    chosen = [n for n in candidates if rng.random() < _RENAME_P] or [rng.choice(candidates)]
    words = set(re.findall(r"\w+", text))
    fresh = (f"var_{k}" for k in range(1, len(words) + len(chosen) + 2) if f"var_{k}" not in words)
    new_name = {n: next(fresh) for n in chosen}
    edits = sorted({(u.row, u.col, u.name) for u in local if u.name in new_name}, reverse=True)
    out = text
    for row, col, name in edits:
        t = name_at[(row, col)]
        at = starts[row] + t.start[1]
        out = out[:at] + new_name[name] + out[at + len(name) :]
    return out if _parses(out) else text


INVARIANCE: dict[str, Perturbation] = {
    "whitespace": whitespace,
    "blank_lines": blank_lines,
    "rename_identifiers": rename_identifiers,
}
"""The invariance tests `run_behavioral` runs: name -> perturbation."""


def load_mft(file: Path) -> list[dict]:
    """Minimum-functionality examples from a JSONL file of `{"text": str, "label": str}` objects.

    Blank lines are skipped; a malformed line is a UserError naming the file and the line number.
    """
    file = Path(file)
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise UserError(f"{file}: no such MFT file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: cannot read MFT file ({e})") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(
                f"{file}:{number}: expected a JSON object with 'text' and 'label', got {type(row).__name__}"
            )
        for key in ("text", "label"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{file}:{number}: '{key}' must be a non-empty string")
        examples.append({"text": row["text"], "label": row["label"]})
    if not examples:
        raise UserError(f"{file}: no MFT examples")
    return examples


def _predict(predict: Predict, texts: list[str]) -> list[str]:
    """One batched call; nothing to predict makes no call."""
    if not texts:
        return []
    labels = [str(y) for y in predict(list(texts))]
    if len(labels) != len(texts):
        raise ValueError(f"predict returned {len(labels)} labels for {len(texts)} texts")
    return labels


def _failure(text: str, expected: str, predicted: str) -> dict:
    return {"text": text[:FAILURE_CHARS], "expected": expected, "predicted": predicted}


def _rate(passed: int, n: int) -> float | None:
    return passed / n if n else None


def _invariance(
    predict: Predict, originals: list[str], before: list[str], perturb: Perturbation, rng: random.Random
) -> dict:
    pairs = [(k, changed) for k, text in enumerate(originals) if (changed := perturb(text, rng)) != text]
    after = _predict(predict, [changed for _, changed in pairs])
    failed = [k for (k, _), label in zip(pairs, after) if label != before[k]]
    labels_after = {k: label for (k, _), label in zip(pairs, after)}
    return {
        "pass_rate": _rate(len(pairs) - len(failed), len(pairs)),
        "n": len(pairs),
        "not_applicable": len(originals) - len(pairs),
        "failures": [_failure(originals[k], before[k], labels_after[k]) for k in failed[:FAILURE_EXAMPLES]],
    }


def _mft(predict: Predict, mft: Sequence[dict], labels: Iterable[str] | None) -> dict:
    known = None if labels is None else set(labels)
    runnable = [ex for ex in mft if known is None or ex["label"] in known]
    predicted = _predict(predict, [ex["text"] for ex in runnable])
    per_label: dict[str, dict] = {}
    failures = []
    for ex, label in zip(runnable, predicted):
        entry = per_label.setdefault(ex["label"], {"passed": 0, "n": 0})
        entry["n"] += 1
        entry["passed"] += label == ex["label"]
        if label != ex["label"]:
            failures.append(_failure(ex["text"], ex["label"], label))
    passed = sum(e["passed"] for e in per_label.values())
    return {
        "pass_rate": _rate(passed, len(runnable)),
        "n": len(runnable),
        "unknown_label": len(mft) - len(runnable),
        "per_label": {
            name: {"pass_rate": _rate(e["passed"], e["n"]), "n": e["n"]} for name, e in sorted(per_label.items())
        },
        "failures": failures[:FAILURE_EXAMPLES],
    }


def run_behavioral(
    predict: Predict,
    texts: Iterable[str],
    mft: Sequence[dict] | None,
    sample: int,
    seed: int,
    *,
    labels: Iterable[str] | None = None,
) -> dict:
    """Run every invariance test in INVARIANCE on a seeded sample of `texts`, and the MFT examples.

    Args:
        predict: labels for a batch of texts; called once for the sample, once per invariance test and
            once for the MFT examples (never with an empty batch).
        texts: texts to perturb (e.g. the test split); at most `sample` of them are drawn with `seed`,
            the same draw for every test.
        mft: examples from `load_mft`; None or empty skips the MFT (its pass_rate is None).
        sample: how many texts at most the invariance tests use (>= 1).
        seed: seeds the draw and each perturbation (`random.Random(f"{seed}:{name}")`).
        labels: the labels the model knows; MFT examples with another label are skipped and counted
            as `unknown_label`. None: every MFT label counts as known.

    Returns:
        `{"invariance": {name: {"pass_rate", "n", "not_applicable", "failures"}},
        "mft": {"pass_rate", "n", "unknown_label", "per_label": {label: {"pass_rate", "n"}}, "failures"},
        "min_pass_rate"}`. A failure is `{"text": first 120 chars of the original, "expected", "predicted"}`
        (for invariance: the label before and after the perturbation); at most 3 a test. A pass_rate is
        None when its test had nothing to run (n == 0); `min_pass_rate` is the lowest of the invariance
        and overall MFT pass rates that are not None (None when no test ran).
    """
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise UserError(f"behavioral sample must be a positive integer, got {sample!r}")
    texts = list(texts)
    draw = random.Random(seed)
    originals = [texts[k] for k in sorted(draw.sample(range(len(texts)), min(sample, len(texts))))]
    before = _predict(predict, originals)
    invariance = {
        name: _invariance(predict, originals, before, perturb, random.Random(f"{seed}:{name}"))
        for name, perturb in INVARIANCE.items()
    }
    mft_report = _mft(predict, list(mft or []), labels)
    rates = [r["pass_rate"] for r in invariance.values()] + [mft_report["pass_rate"]]
    rates = [r for r in rates if r is not None]
    return {"invariance": invariance, "mft": mft_report, "min_pass_rate": min(rates) if rates else None}
