"""Packaging: every third-party import is a declared dependency, extras hold what only they need, constraints.txt
pins everything with hashes, and the Bento's requirements are the serving set.

Imports are read as source (ast), top-level and inside functions; an import inside a `try` that catches
ImportError is optional by construction (the code says what it does without it) and needs no declaration.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import files, packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("flows", "tasks", "models", "deploy", "bench")
EXTRAS_BY_FOLDER = {"bench": ("bench", "dev")}
"""Extras a folder's modules may import besides the core: bench/ is developer tooling, run from a `make install`."""
SERVICES = ("deploy/service.py", "deploy/grpc_server.py")
"""What a Bento runs (`bentoml serve`, the gRPC front end); their import closure is the serving set."""
NOT_SERVED = {"onnx": "models/onnx_runtime.py imports it only for evaluate's parameter count"}
"""Imports in the serving closure that serving never reaches, and why."""
TORCH_WHEELS = Path("/opt/wheels")
"""The Makefile's TORCH_WHEELS on this machine kind: the CPU wheel of torch that pip takes."""


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _catches_import_error(node: ast.Try) -> bool:
    caught = {n.id for h in node.handlers if h.type is not None for n in ast.walk(h.type) if isinstance(n, ast.Name)}
    return bool(caught & {"ImportError", "ModuleNotFoundError"})


def _imports(tree: ast.AST, optional: bool = False):
    """(dotted module, optional) of every absolute import under `tree`; relative imports are the project's own."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name, optional) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module, optional
        elif isinstance(node, ast.Try) and _catches_import_error(node):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.handlers + node.orelse + node.finalbody:
                yield from _imports(child, optional)
        else:
            yield from _imports(node, optional)


@cache
def _parsed(file: Path) -> ast.Module:
    return ast.parse(file.read_text(), filename=str(file))


def _first_party(top: str, file: Path) -> bool:
    """The project's packages, and for a script folder without __init__.py (bench/) its sibling modules."""
    siblings = not (file.parent / "__init__.py").exists() and (file.parent / f"{top}.py").exists()
    return top in PACKAGES or siblings


def _third_party(file: Path) -> dict[str, bool]:
    """Third-party dotted modules `file` imports -> whether every import of it is optional."""
    found: dict[str, bool] = {}
    for dotted, optional in _imports(_parsed(file)):
        top = dotted.split(".")[0]
        if top in sys.stdlib_module_names or top == "__future__" or _first_party(top, file):
            continue
        found[dotted] = found.get(dotted, True) and optional
    return found


def _project_files() -> list[Path]:
    return [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]


@cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()


@cache
def _owners(dotted: str) -> frozenset[str]:
    """Installed distributions that provide `dotted` (for a namespace package such as `google`, the one that
    holds `google.protobuf`, not every distribution under `google`)."""
    top = dotted.split(".")[0]
    owners = _distributions().get(top, [])
    spec = importlib.util.find_spec(top)
    if len(owners) > 1 and spec is not None and spec.origin is None:  # a namespace package
        prefix = "/".join(dotted.split(".")[:2])
        owners = [d for d in owners if any(str(f).startswith(prefix) for f in files(d) or [])]
    return frozenset(canonicalize_name(d) for d in owners)


def _allowed(file: Path) -> set[str]:
    project = _pyproject()
    allowed = _names(project["dependencies"])
    for extra in EXTRAS_BY_FOLDER.get(file.relative_to(ROOT).parts[0], ()):
        allowed |= _names(project["optional-dependencies"][extra])
    return allowed


def test_every_imported_third_party_module_is_a_declared_dependency():
    undeclared = []
    for file in _project_files():
        allowed = _allowed(file)
        for dotted, optional in _third_party(file).items():
            owners = _owners(dotted)
            if not optional and not owners & allowed:
                shown = ", ".join(sorted(owners)) or "not installed"
                undeclared.append(f"{file.relative_to(ROOT)}: import {dotted} ({shown})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)


def test_the_team_stack_driver_and_the_stub_generator_are_extras_not_core():
    project = _pyproject()
    core, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert "psycopg2-binary" not in core and "psycopg2-binary" in _names(extras["stack"])
    assert "grpcio-tools" not in core and "grpcio-tools" in _names(extras["grpc"])
    assert {"grpcio", "protobuf"} <= core  # the gRPC server (deploy/grpc_server.py) imports both


def _locked() -> dict[str, tuple[str, list[str]]]:
    """constraints.txt: distribution -> (pinned version, its hashes)."""
    text = (ROOT / "constraints.txt").read_text()
    pins = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        if block.startswith("#") or not block.strip():
            continue
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        assert m, f"constraints.txt: not a pin: {block.splitlines()[0]}"
        pins[canonicalize_name(m[1])] = (m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_constraints_pin_every_declared_dependency_with_hashes():
    project, locked = _pyproject(), _locked()
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert not [name for name, (_, hashes) in locked.items() if not hashes]
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in locked, f"{name} is declared but not in constraints.txt: run make constraints"
        assert req.specifier.contains(locked[name][0], prereleases=True), f"{name}=={locked[name][0]} vs {req}"


def test_constraints_hold_torch_as_the_cpu_wheel_pip_takes_here():
    version, hashes = _locked()["torch"]
    assert version.endswith("+cpu")
    assert not [n for n in _locked() if n.startswith("nvidia-cu") or n == "triton"]  # no CUDA runtime wheels
    wheels = sorted(TORCH_WHEELS.glob(f"torch-{version}-*.whl"))
    for wheel in wheels:  # only on a machine that has the wheel folder; the pin above holds everywhere
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() in hashes


def _serving_requirements() -> dict[str, str]:
    lines = (ROOT / "deploy" / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def test_the_bento_requirements_are_pinned_as_in_constraints_and_serve_with_mlflow_skinny():
    serving, locked = _serving_requirements(), _locked()
    assert "mlflow-skinny" in serving and "mlflow" not in serving
    for name, spec in serving.items():
        assert spec.startswith("=="), f"deploy/requirements.txt: {name} is not pinned"
        assert spec[2:] == locked[name][0].split("+")[0], f"deploy/requirements.txt: {name}{spec} vs constraints.txt"


def _project_module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _serving_closure() -> set[Path]:
    """Project files the services import, transitively (imports inside functions too) with their packages."""
    todo, seen = [ROOT / s for s in SERVICES], set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        for node in ast.walk(_parsed(file)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] in PACKAGES]
            else:
                continue
            for dotted in targets:
                parts = dotted.split(".")
                found = [_project_module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
                todo += [f for f in found if f is not None]
    return seen


def test_the_bento_carries_every_module_and_distribution_the_services_import():
    bentofile = yaml.safe_load((ROOT / "deploy" / "bentofile.yaml").read_text())
    included = {f for pattern in bentofile["include"] for f in ROOT.glob(pattern)}
    closure = _serving_closure()
    assert not sorted(str(f.relative_to(ROOT)) for f in closure - included), "not in bentofile.yaml's include"
    serving = set(_serving_requirements())
    missing = sorted(
        f"{file.relative_to(ROOT)}: {dotted}"
        for file in closure
        for dotted, optional in _third_party(file).items()
        if not optional and dotted.split(".")[0] not in NOT_SERVED and not _owners(dotted) & serving
    )
    assert not missing, "imported by the services, not in deploy/requirements.txt:\n" + "\n".join(missing)


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    """What a clean install must do: import every module of flows, tasks, models, deploy and bench (~10 s)."""
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed.append(f'{name}: {e!r}')\n"
        "print('\\n'.join(failed))\n"
    )
    names = []
    for file in _project_files():
        parts = file.relative_to(ROOT).with_suffix("").parts
        parts = parts[1:] if parts[0] == "bench" else parts  # bench/ holds scripts, importable by file name
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    res = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr[-3000:]
