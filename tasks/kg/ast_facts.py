"""The knowledge base and the silver task data read from code: distant supervision from the AST.

Every parsable `kind == "code"` row of the clean corpus is one module. Its classes, functions and
methods (with the builtins) are the entities; what its code states (raises, returns an instance of,
calls, inherits) are the facts. The texts the models read are its docstrings; a mention is an
identifier-like span of a docstring (a plain or dotted name, `name()`, a name in backticks or quotes)
that resolves to a definition visible from that docstring: the function's parameters, the class's
members, the module's definitions and imports (`from x import y`, `import x.y as z`, relative imports),
a fully qualified name, or a builtin. Its label is the kind of what it resolves to; its link is that
entity. Relation candidates pair the documented definition (head -1) with each mention that is not a
parameter; gold is what the AST says about the pair.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import keyword
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from tasks.kg.records import (
    NONE,
    OWNER,
    KgTables,
    frame,
)

DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?!\w)")
"""An identifier-like span: a plain or dotted name (not part of a longer word or dotted name)."""
LABELS = {"module": "module", "class": "class", "exception": "exception", "function": "function", "method": "function"}
"""Mention label of each entity kind (methods are `function`)."""
PARAMETER = "\0parameter"
"""The scope value of a parameter name (not an entity id)."""
INSTANCE = ("self", "cls")
"""Conventional first parameters: not documented parameters; `self.x` resolves `x` in the class."""
STOPWORDS = frozenset(
    "a an the i to of on at by be it do so no up we me my he us this that these those into than then but "
    "are was has have will can may".split()
)
"""Unmarked English words never taken as mentions (a parameter named `a` or `it` would tag them everywhere)."""
ENGLISH_BUILTINS = frozenset(
    "all any object type open input print set map filter range format next id hash min max sum property super "
    "help exit quit copyright credits license vars compile slice round sorted reversed iter dir zip".split()
)
"""Builtins that are plain English words: mentions only when marked (backticks, quotes or `name()`)."""
QUOTES = frozenset("`'\"")
"""Characters that mark a name in prose (with a following `(`)."""
MAX_HOPS = 4
"""Re-exports followed when resolving a name through modules (`os.path` -> `posixpath`)."""


def module_name(source: str) -> str:
    """`email/message.py` -> `email.message`, `email/__init__.py` -> `email`."""
    parts = source.removesuffix(".py").replace("\\", "/").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(p for p in parts if p)


def first_line(doc: str | None) -> str:
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def dotted(expr: ast.AST) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attribute chains."""
    parts = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name):
        return None
    return [expr.id, *reversed(parts)]


def own_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes of `node`'s own code: nested functions, classes and lambdas (their own scopes) left out."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, SCOPES):
            if isinstance(child, ast.ClassDef):
                stack += child.bases  # a nested class's bases are evaluated in this scope
            continue
        yield child
        stack += ast.iter_child_nodes(child)


def block_defs(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Definitions of a block, including those inside if/try/with at the same level (first one wins later)."""
    for stmt in body:
        if isinstance(stmt, DEFS):
            yield stmt
        elif isinstance(stmt, (ast.If, ast.Try, ast.With, ast.AsyncWith, getattr(ast, "TryStar", ast.Try))):
            for block in ("body", "orelse", "finalbody"):
                yield from block_defs(getattr(stmt, block, []))
            for handler in getattr(stmt, "handlers", []):
                yield from block_defs(handler.body)


def imports(nodes: Iterable[ast.AST], module: str, is_package: bool) -> dict[str, str]:
    """Local name -> qualified name of what it imports (`import x.y` binds x; `from .m import y` is absolute)."""
    out: dict[str, str] = {}
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]  # `import x.y` binds x; `import x.y as z` binds z to x.y
                out.setdefault(alias.asname or top, alias.name if alias.asname else top)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            prefix = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            for alias in node.names:
                if alias.name != "*":
                    out.setdefault(alias.asname or alias.name, f"{prefix}.{alias.name}" if prefix else alias.name)
    return out


def builtin_entities() -> list[dict]:
    """The builtins' classes, exceptions and functions as entities of module `builtins`."""
    rows = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj):
            continue
        if isinstance(obj, type):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            signature = ""
        else:
            kind = "function"
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = ""
        rows.append(
            {
                "id": f"builtins.{name}",
                "name": name,
                "kind": kind,
                "module": "builtins",
                "source": "",
                "signature": signature,
                "doc": first_line(obj.__doc__),
            }
        )
    return rows


@dataclass
class ParsedModule:
    """One parsed file: its module id, source, tree and module-level names (name -> qualified name)."""

    id: str
    source: str
    tree: ast.Module
    names: dict[str, str] = field(default_factory=dict)


class KnowledgeBase:
    """The entities by id, each module's namespace, and name resolution over them."""

    def __init__(self, entities: dict[str, dict], namespaces: dict[str, dict[str, str]]) -> None:
        self.entities = entities
        self.namespaces = namespaces
        self.members: dict[str, dict[str, str]] = {}
        """Each class's members, inherited ones included (name -> entity id); set by `knowledge_base`."""
        self._resolved: dict[str, str | None] = {}

    def kind(self, entity_id: str) -> str:
        return self.entities[entity_id]["kind"]

    def qualified(self, name: str, hops: int = 0) -> str | None:
        """The entity a qualified name means: itself, or what a module re-exports under that name."""
        if name in self.entities:
            return name
        if hops > MAX_HOPS:
            return None
        if hops == 0 and name in self._resolved:
            return self._resolved[name]
        parts = name.split(".")
        found = None
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in self.entities:
                found = self.follow(prefix, parts[i:], hops)
                break
        if hops == 0:
            self._resolved[name] = found
        return found

    def follow(self, entity_id: str | None, rest: list[str], hops: int = 0) -> str | None:
        """`entity_id.rest[0].rest[1]...`: members, submodules, or names a module imports."""
        for i, part in enumerate(rest):
            if entity_id is None:
                return None
            member = f"{entity_id}.{part}"
            if member in self.entities or part in self.members.get(entity_id, {}):
                entity_id = member if member in self.entities else self.members[entity_id][part]
                continue
            target = self.namespaces.get(entity_id, {}).get(part) if self.kind(entity_id) == "module" else None
            if target is None or hops >= MAX_HOPS:
                return None
            return self.follow(self.qualified(target, hops + 1), rest[i + 1 :], hops + 1)
        return entity_id


@dataclass
class Scope:
    """What a name in one place resolves against, innermost first (each maps name -> qualified name)."""

    kb: KnowledgeBase
    tables: list[dict[str, str]]
    instance: str | None = None
    """The class `self`/`cls` stand for (methods only)."""

    def resolve(self, parts: list[str]) -> str | None:
        """The entity id `parts` names, PARAMETER for a parameter, None if it names nothing known."""
        if self.instance and parts[0] in INSTANCE and len(parts) > 1:
            return self.kb.follow(self.instance, parts[1:])
        for table in self.tables:
            if parts[0] in table:
                target = table[parts[0]]
                if target == PARAMETER:
                    return PARAMETER if len(parts) == 1 else None
                return self.kb.follow(self.kb.qualified(target), parts[1:])
        builtin = f"builtins.{parts[0]}"
        if builtin in self.kb.entities:
            return self.kb.follow(builtin, parts[1:])
        return self.kb.qualified(".".join(parts)) if len(parts) > 1 else None


@dataclass
class Definition:
    """A module, class, function or method, with what resolving names inside it needs."""

    id: str
    node: ast.AST
    module: ParsedModule
    parent: str | None = None
    """The enclosing class of a method (or nested class)."""
    members: dict[str, str] = field(default_factory=dict)
    """A class's own members (name -> entity id); `KnowledgeBase.members` adds the inherited ones."""


def _entity(d: Definition, kind: str) -> dict:
    node = d.node
    callable_ = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    return {
        "id": d.id,
        "name": d.id.rsplit(".", 1)[-1],
        "kind": kind,
        "module": d.module.id,
        "source": d.module.source,
        "signature": f"({ast.unparse(node.args)})" if callable_ else "",
        "doc": first_line(ast.get_docstring(node, clean=False)),
    }


def _collect(module: ParsedModule, entities: dict[str, dict], defs: list[Definition]) -> None:
    """Add a module's definitions (classes, functions, methods, nested classes) to `entities` and `defs`."""
    mod = Definition(module.id, module.tree, module)
    entities[module.id] = _entity(mod, "module")
    defs.append(mod)
    stack = [(module.tree.body, module.id, None)]
    while stack:
        body, prefix, parent = stack.pop()
        for node in block_defs(body):
            entity_id = f"{prefix}.{node.name}"
            if entity_id in entities:
                continue  # a redefinition (if/else branches): the first one is the entity
            is_class = isinstance(node, ast.ClassDef)
            d = Definition(entity_id, node, module, parent)
            entities[entity_id] = _entity(d, "class" if is_class else "method" if parent else "function")
            defs.append(d)
            if is_class:
                stack.append((node.body, entity_id, entity_id))
            if prefix == module.id:
                module.names[node.name] = entity_id
    is_package = module.source.replace("\\", "/").endswith("__init__.py")
    for name, target in imports(own_nodes(module.tree), module.id, is_package).items():
        module.names.setdefault(name, target)


def parse_modules(rows: Iterable[tuple[str, str]]) -> tuple[list[ParsedModule], list[str]]:
    """(source, code) rows -> the parsed modules (one per module id, sorted) and the sources that did not parse."""
    modules: dict[str, ParsedModule] = {}
    unparsable = []
    for source, code in sorted(rows):
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            unparsable.append(source)
            continue
        module_id = module_name(source)
        if module_id and module_id not in modules:
            modules[module_id] = ParsedModule(module_id, source, tree)
    return list(modules.values()), unparsable


def knowledge_base(modules: list[ParsedModule]) -> tuple[KnowledgeBase, list[Definition]]:
    """The entities (builtins included) and every definition, with exception classes found by inheritance."""
    entities = {e["id"]: e for e in builtin_entities()}
    defs: list[Definition] = []
    for module in modules:
        _collect(module, entities, defs)
    by_id = {d.id: d for d in defs}
    for d in defs:
        if d.parent:
            by_id[d.parent].members[d.id.rsplit(".", 1)[-1]] = d.id
    kb = KnowledgeBase(entities, {m.id: m.names for m in modules})
    classes = [d for d in defs if isinstance(d.node, ast.ClassDef)]
    changed = True
    while changed:  # an exception is a class that inherits one, through any number of modules
        changed = False
        for d in classes:
            if entities[d.id]["kind"] == "class" and "exception" in {
                kb.kind(b) for b in _bases(d, kb) if b in entities
            }:
                entities[d.id]["kind"] = "exception"
                changed = True
    bases = {d.id: [b for b in _bases(d, kb) if b in by_id] for d in classes}
    for d in classes:
        kb.members[d.id] = _inherited(d.id, by_id, bases, set())
    return kb, defs


def _inherited(class_id: str, by_id: dict[str, Definition], bases: dict[str, list[str]], seen: set[str]) -> dict:
    """A class's own members, then its bases' (depth first, left to right; a cycle stops)."""
    seen.add(class_id)
    members = dict(by_id[class_id].members)
    for base in bases.get(class_id, []):
        if base not in seen:
            for name, member in _inherited(base, by_id, bases, seen).items():
                members.setdefault(name, member)
    return members


def _bases(d: Definition, kb: KnowledgeBase) -> list[str]:
    scope = Scope(kb, [d.module.names])
    found = (scope.resolve(parts) for parts in map(dotted, d.node.bases) if parts)
    return [b for b in found if b and b != PARAMETER]


def _parameters(node: ast.AST) -> dict[str, str]:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {}
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
    return {n: PARAMETER for n in names if n not in INSTANCE}


def scopes(d: Definition, kb: KnowledgeBase, by_id: dict[str, Definition]) -> tuple[Scope, Scope]:
    """(code scope, text scope) of a definition: Python's own rules for its code; its docstring also sees
    the members of its class (a docstring says `close()` for the sibling method)."""
    module = d.module
    is_package = module.source.replace("\\", "/").endswith("__init__.py")
    params = _parameters(d.node)
    is_function = isinstance(d.node, (ast.FunctionDef, ast.AsyncFunctionDef))
    local = imports(own_nodes(d.node), module.id, is_package) if is_function else {}  # imports inside the body
    is_class = isinstance(d.node, ast.ClassDef)
    owner_class = d.id if is_class else d.parent
    members = kb.members.get(owner_class, {}) if owner_class else {}
    code = Scope(kb, [params, local, module.names], instance=d.parent)
    text = Scope(kb, [params, members, local, module.names], instance=owner_class)
    return code, text


def facts(d: Definition, scope: Scope) -> set[tuple[str, str, str]]:
    """What the definition's own code states: raises X, returns an instance of X, calls X, inherits X."""
    kb = scope.kb
    found: set[tuple[str, str, str]] = set()

    def add(relation: str, expr: ast.AST, kinds: tuple[str, ...] | None = None) -> None:
        parts = dotted(expr)
        target = scope.resolve(parts) if parts else None
        if target and target != PARAMETER and (kinds is None or kb.kind(target) in kinds):
            found.add((d.id, relation, target))

    if isinstance(d.node, ast.ClassDef):
        for base in d.node.bases:
            add("inherits", base, ("class", "exception"))
    for node in own_nodes(d.node):
        if isinstance(node, ast.Raise) and node.exc is not None:
            add("raises", node.exc.func if isinstance(node.exc, ast.Call) else node.exc, ("class", "exception"))
        elif isinstance(node, ast.Return) and isinstance(node.value, ast.Call):
            add("returns", node.value.func, ("class", "exception"))
        if isinstance(node, ast.Call):
            add("calls", node.func)
    return found


def mentions(text: str, scope: Scope) -> list[tuple[int, int, str, str]]:
    """(start, end, label, link) of each span of `text` that resolves in `scope`, in order, never overlapping."""
    kb = scope.kb
    out = []
    for m in NAME.finditer(text):
        start, end = m.span()
        surface = m.group()
        parts = surface.split(".")
        before, after = text[start - 1 : start], text[end : end + 1]
        if any(keyword.iskeyword(p) for p in parts) or (before == ":" and after == ":"):
            continue  # Python keywords, and Sphinx roles (`:func:`)
        marked = before in QUOTES or after in QUOTES or after == "("
        if len(parts) == 1 and not marked and surface.lower() in STOPWORDS:
            continue
        target = scope.resolve(parts)
        if target is None:
            continue
        if target == PARAMETER:
            out.append((start, end, "parameter", ""))
            continue
        if not marked and target == f"builtins.{surface}" and surface in ENGLISH_BUILTINS:
            continue
        out.append((start, end, LABELS[kb.kind(target)], target))
    return out


PRIORITY = ("raises", "returns", "inherits", "calls")
"""The gold label of a pair the AST relates in several ways (`raise X(...)` also calls X)."""


def cut(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` at a line boundary (inside the line only if its first line is longer)."""
    if len(text) <= max_chars:
        return text
    at = text.rfind("\n", 0, max_chars + 1)
    return text[: at if at > 0 else max_chars].rstrip()


def relation_label(owner_facts: dict[str, set[str]], link: str) -> str:
    """The gold relation of (owner, link): the first of PRIORITY the AST states, else `none`."""
    stated = owner_facts.get(link, set())
    return next((r for r in PRIORITY if r in stated), NONE)


def _doc_rows(d: Definition, text_scope: Scope, owner_facts: dict, max_chars: int, out: dict[str, list]) -> None:
    """Append the definition's doc, its mentions and its relation candidates to `out`."""
    text = ast.get_docstring(d.node, clean=True)
    if not text or not text.strip():
        return
    text = cut(text, max_chars)
    doc_id = f"{d.module.source}#{d.id}"
    out["docs"].append((doc_id, text, d.module.source, d.module.id, d.id, ""))
    for m, (start, end, label, link) in enumerate(mentions(text, text_scope)):
        out["mentions"].append((doc_id, m, start, end, label, link))
        if label != "parameter":
            out["relations"].append((doc_id, OWNER, m, relation_label(owner_facts, link)))


def build(rows: Iterable[tuple[str, str]], max_chars: int) -> tuple[KgTables, list[str]]:
    """The task data from (source, code) rows (splits left ""), and the sources that did not parse."""
    modules, unparsable = parse_modules(rows)
    kb, defs = knowledge_base(modules)
    by_id = {d.id: d for d in defs}
    out: dict[str, list] = {"docs": [], "mentions": [], "relations": [], "facts": []}
    for d in defs:
        code_scope, text_scope = scopes(d, kb, by_id)
        stated = facts(d, code_scope)
        out["facts"] += stated
        owner_facts: dict[str, set[str]] = {}
        for _, relation, tail in stated:
            owner_facts.setdefault(tail, set()).add(relation)
        _doc_rows(d, text_scope, owner_facts, max_chars, out)
    tables = KgTables(
        entities=frame(sorted(kb.entities.values(), key=lambda e: e["id"]), "entities"),
        docs=frame(sorted(out["docs"]), "docs"),
        mentions=frame(sorted(out["mentions"]), "mentions"),
        relations=frame(sorted(out["relations"]), "relations"),
        facts=frame(sorted(set(out["facts"])), "facts"),
    )
    return tables, unparsable
