"""The import graph of the project: no cycles, layers that point down, stages apart, public APIs only.

Every project module (flows, tasks, models, deploy, bench) is read as source (ast), and every import
counts: `import x`, `from x import y`, relative imports and imports inside functions or branches.
"""

from __future__ import annotations

import ast
import functools
import sys
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "models", "deploy", "bench")
GENERATED = {"deploy/lmforge_pb2.py", "deploy/lmforge_pb2_grpc.py"}
"""grpcio-tools' output (`make grpc-stubs`): not code this project writes."""


@dataclass
class Module:
    name: str
    file: Path
    tree: ast.Module
    imports: dict[str, int] = field(default_factory=dict)
    """Project modules it imports -> the line of the first such import."""
    libraries: dict[str, str] = field(default_factory=dict)
    """Names it binds to a third-party import -> the dotted module or object they come from."""


def _module_name(file: Path) -> str:
    parts = file.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _third_party(dotted: str) -> bool:
    top = dotted.split(".")[0]
    return bool(top) and top not in PACKAGES and top not in sys.stdlib_module_names and top != "__future__"


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement may load (`from a import b` may load module a.b)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


@cache
def project() -> dict[str, Module]:
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {}
    for f in files:
        if f.relative_to(ROOT).as_posix() in GENERATED or ".venv" in f.parts:
            continue
        modules[_module_name(f)] = Module(_module_name(f), f, ast.parse(f.read_text(), filename=str(f)))
    for m in modules.values():
        for node in ast.walk(m.tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, m.name, m.file.name == "__init__.py"):
                if target in modules and target != m.name:
                    m.imports.setdefault(target, node.lineno)
            _bind_libraries(m, node)
    return modules


def _bind_libraries(m: Module, node: ast.Import | ast.ImportFrom) -> None:
    if isinstance(node, ast.Import):
        for a in node.names:
            if _third_party(a.name):
                m.libraries[a.asname or a.name.split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
    elif not node.level and _third_party(node.module or ""):
        for a in node.names:
            m.libraries[a.asname or a.name] = f"{node.module}.{a.name}"


def _where(m: Module, line: int) -> str:
    return f"{m.file.relative_to(ROOT)}:{line}"


def _cycle_through(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """One concrete cycle from `start` back to itself inside a strongly connected set."""
    path, seen = [start], {start}

    def walk(node: str) -> bool:
        for nxt in sorted(graph[node]):
            if nxt == start:
                return True
            if nxt in members and nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                if walk(nxt):
                    return True
                path.pop()
        return False

    walk(start)
    return path + [start]


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """Tarjan's strongly connected components with more than one module (every import cycle lies in one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycles(modules: dict[str, Module]) -> list[str]:
    """One line per import cycle: `a -> b (file:line) -> ... -> a`."""
    graph = {name: m.imports for name, m in modules.items()}
    lines = []
    for component in strongly_connected(graph):
        loop = _cycle_through(graph, min(component), component)
        hops = [f"{a} -> {b} ({_where(modules[a], graph[a][b])})" for a, b in zip(loop, loop[1:])]
        lines.append(f"cycle of {len(component)} modules: " + "; ".join(hops))
    return lines


def closure(modules: dict[str, Module], start: str) -> dict[str, str]:
    """Every module `start` imports, transitively -> the module that imports it."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        name = todo.pop()
        for target in modules[name].imports:
            if target not in via and target != start:
                via[target] = name
                todo.append(target)
    return via


@functools.cache
def stage_modules() -> list[str]:
    stages = (yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages") or {}
    return sorted({str(body["cmd"]).split()[-1] for body in stages.values()})


def task_part(name: str) -> bool:
    """A module of a task's package (tasks/<task>/*.py) that is not one of its stages: what its stages share."""
    return (
        name.startswith("tasks.")
        and name.count(".") >= 2
        and not name.startswith(("tasks.shared", "tasks.ops"))
        and name not in stage_modules()
    )


LAYERS = [
    ("models", lambda n: n.startswith("models")),
    ("plumbing", lambda n: n == "tasks" or n.startswith("tasks.shared")),
    ("task parts", task_part),
    (
        "stages and serving",
        lambda n: n.startswith("deploy") or (n.startswith("tasks.") and n.count(".") == 1) or n in stage_modules(),
    ),
    ("operations", lambda n: n.startswith("tasks.ops")),
    ("flows and benchmarks", lambda n: n.startswith(("flows", "bench"))),
]
"""From the bottom up: a module imports its own layer or the ones below, never one above."""


def layer(name: str) -> int:
    for rank, (_, member) in enumerate(LAYERS):
        if member(name):
            return rank
    raise AssertionError(f"{name}: in no layer of LAYERS")


# ---------------------------------------------------------------------------------------------
# the checks themselves, on small made-up graphs


def test_a_cycle_of_any_length_is_found_and_named():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {"e": 5}}
    assert strongly_connected(graph) == [{"a", "b", "c"}]
    assert _cycle_through(graph, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b": 1}, "b": {}}) == []


def test_every_kind_of_import_is_an_edge(tmp_path):
    source = (
        "import tasks.shared.io\n"
        "from tasks.shared import errors\n"
        "from . import lineage\n"
        "from .dag import stage_names\n"
        "def later():\n"
        "    if True:\n"
        "        from flows.stages import run_stage\n"
    )
    node_targets = [
        t
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for t in _targets(node, "tasks.ops.promote", False)
    ]
    assert {
        "tasks.shared.io",
        "tasks.shared.errors",
        "tasks.ops.lineage",
        "tasks.ops.dag",
        "flows.stages",
    } <= set(node_targets)


# ---------------------------------------------------------------------------------------------
# the project


def test_the_project_has_no_import_cycle():
    assert cycles(project()) == []


def test_nothing_under_tasks_imports_the_flows():
    modules = project()
    found = []
    for name in sorted(n for n in modules if n.split(".")[0] == "tasks"):
        for target, via in closure(modules, name).items():
            if target.split(".")[0] == "flows":
                found.append(
                    f"{name} imports {target} (through {via}, {_where(modules[via], modules[via].imports[target])})"
                )
                break
    assert found == []


def test_layers_point_down():
    modules = project()
    upward = [
        f"{_where(m, line)}: {m.name} ({LAYERS[layer(m.name)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for m in modules.values()
        for target, line in m.imports.items()
        if layer(target) > layer(m.name)
    ]
    assert upward == []


def test_no_stage_imports_another_stage():
    modules, stages = project(), stage_modules()
    assert stages and all(s in modules for s in stages)
    found = [
        f"{stage} imports {other} (through {via})"
        for stage in stages
        for other, via in closure(modules, stage).items()
        if other in stages
    ]
    assert found == []


# ---------------------------------------------------------------------------------------------
# public APIs only


def _attribute_root(node: ast.AST) -> ast.AST:
    """The name an attribute chain starts from: `a` of `a.b().c[0]._d`."""
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(m: Module) -> list[str]:
    """A library's private modules, names or attributes used by `m`: an import path or imported name with a
    `_x` part, or a `_x` attribute anywhere in a chain that starts from a name bound to a library's import."""
    found = []
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Import):
            found += [
                (node, f"imports {a.name}") for a in node.names if _third_party(a.name) and _dotted_private(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and not node.level and _third_party(node.module or ""):
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [(node, f"imports {n}") for n in names if _dotted_private(n)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            root = _attribute_root(node)
            if isinstance(root, ast.Name) and root.id in m.libraries:
                found.append((node, f"uses {node.attr} of {m.libraries[root.id]} ({root.id})"))
    return [f"{_where(m, node.lineno)}: {what}" for node, what in found]


def _dotted_private(dotted: str) -> bool:
    return any(_private(part) for part in dotted.split("."))


def _library_object(origin: str):
    """The object a dotted import origin names (`torch`, `mlflow.MlflowClient`), imported now."""
    import importlib

    parts = origin.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(origin)


def _replaces_code(origin: str, owner: ast.AST, attr: str) -> bool:
    """Whether setting `attr` on `owner` (a chain from a library's import) replaces the library's code (a
    function, class or module: a monkeypatch) rather than setting one of its documented flags
    (`torch.backends.cudnn.benchmark = True`). A chain through calls or subscripts cannot be resolved
    here: an object the library made, and lmforge does not write into those."""
    import inspect

    names = []
    while isinstance(owner, ast.Attribute):
        names.append(owner.attr)
        owner = owner.value
    if not isinstance(owner, ast.Name):
        return True
    obj = _library_object(origin)
    for name in reversed(names):
        obj = getattr(obj, name)
    current = getattr(obj, attr, None)
    return callable(current) or inspect.ismodule(current)


def patched_library_attributes(m: Module) -> list[str]:
    """Code of a library replaced at run time (monkeypatching), and BentoML's `output_spec` rewritten."""
    found = []
    for node in ast.walk(m.tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            assigned = node.targets if isinstance(node, ast.Assign) else [node.target]
            targets = [(t.value, t.attr, t) for t in assigned if isinstance(t, ast.Attribute)]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            name = node.args[1] if len(node.args) > 1 else None
            attr = name.value if isinstance(name, ast.Constant) and isinstance(name.value, str) else "?"
            targets = [(node.args[0], attr, node)]
        else:
            continue
        for owner, attr, shown in targets:
            root = _attribute_root(owner)
            library = isinstance(root, ast.Name) and root.id in m.libraries
            if attr == "output_spec" or ".output_spec." in f".{ast.unparse(owner)}.":
                found.append(f"{_where(m, node.lineno)}: rewrites BentoML's output_spec: {ast.unparse(shown)}")
            elif library and _replaces_code(m.libraries[root.id], owner, attr):
                found.append(f"{_where(m, node.lineno)}: replaces library code: {ast.unparse(shown)}")
    return found


REGEX_CALLS = {"search", "match", "fullmatch", "findall", "finditer", "compile", "sub", "split"}
TOOL_MESSAGES = ("exited with",)
"""Phrases of other tools' human-readable output (DVC's `failed to reproduce ...: exited with N`)."""


def parsed_tool_messages(m: Module) -> list[str]:
    """Regular expressions over a tool's human-readable messages."""
    found = []
    for node in ast.walk(m.tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        if node.func.attr in REGEX_CALLS and isinstance(node.func.value, ast.Name) and node.func.value.id == "re":
            pattern = node.args[0]
            text = pattern.value if isinstance(pattern, ast.Constant) and isinstance(pattern.value, str) else ""
            if any(phrase in text for phrase in TOOL_MESSAGES):
                found.append(f"{_where(m, node.lineno)}: re.{node.func.attr}({text!r})")
    return found


BANNED_NAMES = ("_operation_futures",)
"""Private attributes that no chain from an import reveals (they hang off objects a library returned)."""


def banned_names(m: Module) -> list[str]:
    return [
        f"{_where(m, node.lineno)}: {name}"
        for node in ast.walk(m.tree)
        for name in BANNED_NAMES
        if (isinstance(node, ast.Attribute) and node.attr == name)
        or (isinstance(node, ast.Constant) and node.value == name)
    ]


@pytest.mark.parametrize(
    "check", [private_uses, patched_library_attributes, parsed_tool_messages, banned_names], ids=lambda c: c.__name__
)
def test_public_apis_of_libraries_only(check):
    found = [line for m in project().values() for line in check(m)]
    assert found == []


def _check_source(check, source: str) -> list[str]:
    m = Module("tasks.example", ROOT / "tasks" / "example.py", ast.parse(source))
    for node in ast.walk(m.tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            _bind_libraries(m, node)
    return check(m)


@pytest.mark.parametrize(
    "check,source,hits",
    [
        (private_uses, "from bentoml._internal.configuration.containers import BentoMLContainer\n", 1),
        (private_uses, "import mlflow\nmlflow.tracking._tracking_service.utils\n", 1),
        (private_uses, "from bentoml import models\nmodels.get('x')._path\n", 1),
        (private_uses, "import torch.nn.functional as F\nF._canonical_mask\n", 1),
        (private_uses, "import os\nos._exit(0)\nclass A:\n    def f(self):\n        return self._x\n", 0),
        (private_uses, "from tasks.shared import io\nio._atomic('x', False)\nimport mlflow\nmlflow.__version__\n", 0),
        (patched_library_attributes, "import mlflow\nmlflow.log_metric = print\n", 1),
        (patched_library_attributes, "import mlflow.tracking\nmlflow.tracking.MlflowClient.log_batch = print\n", 1),
        (patched_library_attributes, "import torch\ntorch.backends.cudnn.benchmark = True\n", 0),
        (patched_library_attributes, "LMForge.apis['classify'].output_spec.media_type = 'application/json'\n", 1),
        (patched_library_attributes, "import mlflow\nsetattr(mlflow, 'log_metric', print)\n", 1),
        (patched_library_attributes, "class A:\n    def f(self):\n        self.x = 1\n", 0),
        (parsed_tool_messages, "import re\nre.search(r'exited with (-?\\d+)', last)\n", 1),
        (parsed_tool_messages, "print(f'bentoml build exited with code {code}')\n", 0),
        (banned_names, "futures = getattr(ops, '_operation_futures', None)\n", 1),
        (banned_names, "ops._operation_futures\n", 1),
    ],
)
def test_the_public_api_checks_find_what_they_name(check, source, hits):
    assert len(_check_source(check, source)) == hits
