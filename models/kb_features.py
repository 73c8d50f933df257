"""What the knowledge base says about a text, as input features of the extractor (the gazetteer features of NER
systems and the prior features of entity linkers).

The extractor ships its knowledge base (entities.parquet) and the train split's link counts (priors.json), so the
same features are computed in training and at inference from the bundle alone:

- per token (`TOKEN_FEATURES`): whether the token is part of an identifier-like span, its first token, dotted,
  marked (quotes, backticks, `name()`), one of the documented object's parameters, the kinds of the entities
  named like it, builtin, in the subject's module, a member of the subject's class, a qualified id, ambiguous;
- per relation tail (`CUES`): which surface cue of a relation the words around the mention show ("Raises X",
  "Return a X", "subclass of X", "calls X"; the pattern baseline reads the same cues);
- per (mention, candidate) (`LINK_FEATURES`): same module as the subject, member of the subject's class, the
  subject itself, builtin, train prior of the surface string (log count and share), qualified match, same top-level
  package, the candidate's kind.

The subject is the documented object (a doc's `owner`, `extract`'s `subjects[i]`); without one the subject
features are 0.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

KINDS = ("module", "class", "function", "method", "exception")
"""Entity kinds, in feature order."""
TOKEN_FEATURES = (
    "identifier",
    "first",
    "dotted",
    "marked",
    "parameter",
    *(f"kind_{k}" for k in KINDS),
    "builtin",
    "same_module",
    "member",
    "qualified",
    "ambiguous",
)
LINK_FEATURES = (
    "same_module",
    "member",
    "subject",
    "builtin",
    "prior_log_count",
    "prior_share",
    "qualified",
    "same_package",
    *(f"kind_{k}" for k in KINDS),
)
SUBJECT_KINDS = ("", *KINDS)
"""Subject kind ids (0 = no subject)."""
CUE_WINDOW = 40
"""Characters before and after a tail mention that the relation cues read."""
CUES = [
    ("raises", r"\b(raise[sd]?|raising)\W+(an?\s+|the\s+)?$", r"^\W*(is|will be|may be|are)\s+raised\b"),
    ("returns", r"\b(returns?|returning)\s+(an?|the|new)?\s*(new\s+)?\W*$", r"^\W*(instance|object)s?\b.*\breturned\b"),
    ("inherits", r"\b(subclass(es)?\s+of|inherits?(\s+from)?|derived\s+from|based\s+on)\s+(an?\s+|the\s+)?\W*$", None),
    ("calls", r"\b(calls?|calling|called|invokes?|uses)\s+(the\s+)?\W*$", r"^\W*(is|will be|are)\s+called\b"),
]
"""(relation, pattern on the text before the mention, pattern on the text after it), in cue order."""
IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?!\w)")
"""An identifier-like span: a plain or dotted name (not part of a longer word or dotted name)."""
MARKS = frozenset("`'\"")
INSTANCE = ("self", "cls")
BUILTINS = "builtins"

Span = tuple[int, int]
Priors = dict[str, dict[str, int]]
"""Surface string -> entity id -> times it was linked so in train."""


def candidate_name(surface: str) -> str:
    """The entity `name` a mention's text refers to: its last dotted component (`email.message.Message` ->
    `Message`), without call parentheses."""
    return surface.strip().removesuffix("()").rsplit(".", 1)[-1]


def candidate_index(entities: pd.DataFrame) -> dict[str, list[int]]:
    """Entity rows per `name`, each list in `id` order: the candidates of a mention."""
    order = entities.reset_index(drop=True).sort_values("id", kind="stable")
    index: dict[str, list[int]] = {}
    for row, name in zip(order.index, order["name"]):
        index.setdefault(name, []).append(int(row))
    return index


def relation_cues(text: str, tail: Span) -> list[bool]:
    """Per CUES entry: does the text around the mention at `tail` show that relation's cue."""
    before, after = text[max(0, tail[0] - CUE_WINDOW) : tail[0]], text[tail[1] : tail[1] + CUE_WINDOW]
    return [bool(re.search(pre, before, re.I) or (post and re.search(post, after, re.I))) for _, pre, post in CUES]


def parameters(signature: str) -> frozenset[str]:
    """Parameter names of a `(a, b=None, *args)` signature (without self/cls); empty if it does not parse."""
    try:
        args = ast.parse(f"def f{signature}:\n pass").body[0].args
    except (SyntaxError, ValueError, AttributeError, IndexError):
        return frozenset()
    names = [x.arg for x in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if x]
    return frozenset(n for n in names if n not in INSTANCE)


@dataclass(frozen=True)
class Subject:
    """The documented object as the features see it."""

    id: str = ""
    kind: str = ""
    module: str = ""
    owner_class: str = ""
    """The class whose members its docstring sees: itself for a class, its parent for a method."""
    params: frozenset[str] = field(default_factory=frozenset)

    @property
    def kind_id(self) -> int:
        return SUBJECT_KINDS.index(self.kind) if self.kind in SUBJECT_KINDS else 0


@dataclass
class KnowledgeIndex:
    """The knowledge base and the train priors, indexed for the features."""

    entities: pd.DataFrame
    priors: Priors = field(default_factory=dict)

    def __post_init__(self) -> None:
        e = self.entities.reset_index(drop=True)
        self.ids, self.kinds, self.modules = e["id"].tolist(), e["kind"].tolist(), e["module"].tolist()
        self.by_name = candidate_index(e)
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        self.signatures = e["signature"].tolist()

    def subject(self, subject_id: str | None) -> Subject:
        """The subject features of entity `subject_id` (no subject when None, "" or unknown)."""
        row = self.row_of.get(subject_id or "")
        if row is None:
            return Subject()
        kind, own_id = self.kinds[row], self.ids[row]
        owner_class = own_id if kind in ("class", "exception") else own_id.rsplit(".", 1)[0] if kind == "method" else ""
        return Subject(own_id, kind, self.modules[row], owner_class, parameters(self.signatures[row] or ""))

    def _identifier_features(self, text: str, start: int, end: int, subject: Subject) -> np.ndarray:
        surface = text[start:end]
        rows = self.by_name.get(candidate_name(surface), [])
        f = np.zeros(len(TOKEN_FEATURES), dtype=np.float32)
        before, after = text[start - 1 : start] if start else "", text[end : end + 1]
        f[0], f[2] = 1.0, float("." in surface)
        f[3] = float(before in MARKS or after in MARKS or after == "(")
        f[4] = float("." not in surface and surface in subject.params)
        for r in rows:
            f[5 + KINDS.index(self.kinds[r])] = 1.0
        f[10] = float(any(self.modules[r] == BUILTINS for r in rows))
        f[11] = float(bool(subject.module) and any(self.modules[r] == subject.module for r in rows))
        f[12] = float(any(self._member(r, subject) for r in rows))
        f[13] = float("." in surface and any(self._qualified(r, surface) for r in rows))
        f[14] = float(len(rows) >= 2)
        return f

    def _member(self, row: int, subject: Subject) -> bool:
        cid, owner = self.ids[row], subject.owner_class
        return bool(subject.id) and (cid == subject.id or (bool(owner) and cid.startswith(f"{owner}.")))

    def _qualified(self, row: int, surface: str) -> bool:
        cid = self.ids[row]
        return cid == surface or cid.endswith(f".{surface}")

    def token_features(self, text: str, offsets: list[Span], subject: Subject) -> np.ndarray:
        """(T, len(TOKEN_FEATURES)) features of the tokens at `offsets`; tokens outside identifiers are 0."""
        out = np.zeros((len(offsets), len(TOKEN_FEATURES)), dtype=np.float32)
        starts = [s for s, _ in offsets]
        t = 0
        for m in IDENTIFIER.finditer(text):
            start, end = m.span()
            while t < len(offsets) and offsets[t][1] <= start:
                t += 1
            if t >= len(offsets):
                break
            first, f = t, self._identifier_features(text, start, end, subject)
            while t < len(offsets) and starts[t] < end:
                out[t] = f
                t += 1
            if t > first:
                out[first, 1] = 1.0
        return out

    def link_features(self, surface: str, rows: list[int], subject: Subject, held_out: str = "") -> np.ndarray:
        """(len(rows), len(LINK_FEATURES)) features of candidate rows of a mention with text `surface`. `held_out`
        (training only) is the gold id, whose own count is taken out of the prior (leave one out)."""
        counts = dict(self.priors.get(surface.strip(), {}))
        if held_out in counts:
            counts[held_out] -= 1
        total = sum(counts.values())
        top = subject.module.split(".", 1)[0]
        out = np.zeros((len(rows), len(LINK_FEATURES)), dtype=np.float32)
        for i, r in enumerate(rows):
            cid, n = self.ids[r], counts.get(self.ids[r], 0)
            out[i, 0] = float(bool(subject.module) and self.modules[r] == subject.module)
            out[i, 1] = float(self._member(r, subject) and cid != subject.id)
            out[i, 2] = float(cid == subject.id)
            out[i, 3] = float(self.modules[r] == BUILTINS)
            out[i, 4] = math.log1p(n)
            out[i, 5] = n / total if total else 0.0
            out[i, 6] = float("." in surface and self._qualified(r, surface.strip().removesuffix("()")))
            out[i, 7] = float(bool(top) and self.modules[r].split(".", 1)[0] == top)
            out[i, 8 + KINDS.index(self.kinds[r])] = 1.0
        return out
