"""The pipeline as dvc.yaml declares it, and the checks that keep dvc.yaml and dvc.lock honest.

- `stage_names()`: the stages of the default pipeline in dvc.yaml order, the one list that the flow and the CLI
  use; `pipeline_stages()`: those and the stages of the pipelines run only by hand (the learning curve's
  curve/dvc.yaml), whose code deps are generated and checked alike.
- `import_closure()`: every project file a module imports, transitively, imports inside functions included, except
  the imports `VALIDATION_ONLY` exempts (a check that can only refuse to run, never change an output).
- `check_deps()` / `write_deps()`: each stage's code deps in dvc.yaml must be exactly its import
  closure, and its `params:` exactly the sections its module declares (`SECTIONS`, narrowed to `section.key` where
  the module names the keys it reads in `NARROW_PARAMS`); `write_deps`
  rewrites dvc.yaml from the code (comments and data deps kept).
- `read_lock()`: dvc.lock's stages; `stale_lock()`: every code or params dependency whose hash or value in
  dvc.lock differs from the working tree (seconds, nothing runs), so a commit cannot carry a lock of other code.
- `stale_stages()` / `require_current_evaluation()`: what `dvc status` reports out of date in the default
  pipeline, and a refusal to act on an evaluation that does not describe the workspace.

Only the default pipeline (dvc.yaml, dvc.lock) counts for staleness: `dvc status` without targets also
reports the stages of every other dvc.yaml in the repository (the learning curve's), which never make the
pipeline, its evaluation or a promotion out of date.

Nothing here imports a stage: modules are read as source (ast), so the check costs no torch import.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.shared.config.base import read_params_file
from tasks.shared.datasets import dvc_md5
from tasks.shared.errors import UserError
from tasks.shared.outputs import DEFAULT_PIPELINE, PIPELINES
from tasks.shared.tracking import flatten

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("tasks", "models", "flows", "deploy")
"""Top-level packages of this project; imports of anything else are libraries."""
PARAMS_FILE = "params.yaml"
VALIDATION_ONLY = {"tasks/shared/harness.py": "tasks.shared.config.params"}
"""Imports left out of import closures: file -> module it imports only to check params.yaml whole before a stage
runs (`load_params`, whose value is not used). The check can refuse to run a stage but never change its outputs,
so making every stage depend on every section's config module would only make them all stale at once."""
STAGE_CMD = re.compile(r"python -m (tasks(?:\.\w+)+)")
"""A stage command: `python -m tasks.<stage>`, or a task package's stage (`python -m tasks.kg.data`)."""


def dvc_command(*args: str) -> list[str]:
    """`dvc <args>` run by this interpreter, so it works whether or not the venv is on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def load_dvc_yaml(root: Path = ROOT, file: Path = DEFAULT_PIPELINE) -> dict:
    """A pipeline file (the default pipeline's dvc.yaml unless `file` names another) as a mapping."""
    f = Path(root) / file
    try:
        return yaml.safe_load(f.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{f}: not found (run lmforge from the project root)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{f}: invalid YAML: {e}") from None


def stage_names(root: Path = ROOT) -> list[str]:
    """The DVC stages in the order dvc.yaml lists them (an order that respects their dependencies)."""
    return list((load_dvc_yaml(root).get("stages") or {}))


def pipeline_stages(root: Path = ROOT) -> dict[str, dict]:
    """Every stage of every pipeline file (the default pipeline's first, then those run by hand), by name."""
    stages: dict[str, dict] = {}
    for file in PIPELINES:
        if file == DEFAULT_PIPELINE or (Path(root) / file).exists():
            stages.update(load_dvc_yaml(root, file).get("stages") or {})
    return stages


def stage_module(stage: str, body: dict) -> str:
    """The module of a stage's `cmd: python -m tasks.<module>` (`tasks.<stage>`, or a task's `tasks.kg.train`)."""
    m = STAGE_CMD.fullmatch(str(body.get("cmd", "")).strip())
    if not m:
        raise UserError(f"dvc.yaml: stages.{stage}.cmd: expected `python -m tasks.<module>`, got {body.get('cmd')!r}")
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# imports


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The file that defines project module `name` (module.py or package/__init__.py), if any."""
    base = Path(root).joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def imported_names(file: Path, module: str) -> set[str]:
    """Dotted names a module's source imports anywhere (top level, functions, conditionals)."""
    try:
        tree = ast.parse(Path(file).read_text(), filename=str(file))
    except SyntaxError as e:
        raise UserError(f"{file}:{e.lineno}: cannot read its imports: {e.msg}") from None
    package = module if Path(file).name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_closure(module: str, root: Path = ROOT) -> set[str]:
    """Project files (relative POSIX paths) that importing `module` executes, itself included."""
    root = Path(root)
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in PACKAGES:
            continue
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, a/b/c
            prefix = ".".join(parts[:i])
            f = module_file(prefix, root)
            if f is None:
                continue
            rel = f.relative_to(root).as_posix()
            if rel not in seen:
                seen.add(rel)
                todo.extend(n for n in imported_names(f, prefix) if not _exempt(rel, n))
    return seen


def _exempt(importer: str, name: str) -> bool:
    """Whether `importer` (a relative POSIX path) imports `name` only to validate (VALIDATION_ONLY)."""
    module = VALIDATION_ONLY.get(importer)
    return module is not None and (name == module or name.startswith(f"{module}."))


def declared_sections(file: Path) -> list[str]:
    """Keys of the module-level `SECTIONS = {...}` dict literal of a stage module."""
    for node in ast.parse(Path(file).read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "SECTIONS" for t in targets) and isinstance(
                node.value, ast.Dict
            ):
                return [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    raise UserError(f"{file}: no module-level SECTIONS dict (the params.yaml sections the stage reads)")


def narrowed_keys(file: Path) -> dict[str, list[str]]:
    """The module-level `NARROW_PARAMS = {section: (key, ...)}` literal of a stage module ({} without one): sections of
    which the stage reads only these keys, so dvc.yaml tracks `section.key` instead of the whole section."""
    for node in ast.parse(Path(file).read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "NARROW_PARAMS" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            return {str(k): [str(x) for x in v] for k, v in value.items()}
    return {}


def tracked_params(file: Path) -> list[str]:
    """What dvc.yaml's `params:` of a stage lists: its SECTIONS, narrowed to `section.key` by NARROW_PARAMS."""
    narrow = narrowed_keys(file)
    return [p for s in declared_sections(file) for p in ([f"{s}.{k}" for k in narrow[s]] if s in narrow else [s])]


# ---------------------------------------------------------------------------------------------
# dvc.yaml deps


def is_code_dep(dep: str) -> bool:
    """A dvc.yaml dep on project code (a literal path into a project package), not on data."""
    return "${" not in dep and dep.split("/")[0] in PACKAGES


@dataclass
class StageDeps:
    stage: str
    module: str
    code: list[str]
    """What the stage's import closure says its code deps are."""
    sections: list[str]
    """What its module says it reads of params.yaml (`section` or `section.key`)."""


def expected(root: Path = ROOT) -> list[StageDeps]:
    """Per stage, the code deps and params sections the code implies."""
    out = []
    for stage, body in pipeline_stages(root).items():
        module = stage_module(stage, body)
        file = module_file(module, root)
        if file is None:
            raise UserError(f"dvc.yaml: stages.{stage}: module {module} not found")
        out.append(StageDeps(stage, module, sorted(import_closure(module, root)), tracked_params(file)))
    return out


def check_deps(root: Path = ROOT) -> list[str]:
    """One line per disagreement between the pipeline files and the code (empty when they agree)."""
    stages = pipeline_stages(root)
    problems = []
    for want in expected(root):
        body = stages[want.stage]
        listed = [str(d) for d in body.get("deps") or []]
        code = {d.rstrip("/") for d in listed if is_code_dep(d)}
        for f in sorted(set(want.code) - code):
            problems.append(f"{want.stage}: imports {f} but dvc.yaml does not list it in deps")
        for f in sorted(code - set(want.code)):
            problems.append(f"{want.stage}: dvc.yaml lists {f} in deps but the stage does not import it")
        params = [str(p) for p in body.get("params") or []]
        if sorted(params) != sorted(want.sections):
            problems.append(
                f"{want.stage}: dvc.yaml params {params} differ from {want.module}.SECTIONS {want.sections}"
            )
    return problems


def write_deps(root: Path = ROOT) -> bool:
    """Rewrite every stage's code deps and params in the pipeline files from the code; True if anything changed."""
    wanted = {want.stage: want for want in expected(root)}
    changed = False
    for file in PIPELINES:
        if (Path(root) / file).exists():
            changed |= _write_file_deps(Path(root) / file, wanted)
    return changed


def _write_file_deps(path: Path, wanted: dict[str, StageDeps]) -> bool:
    """Rewrite the code deps and params of the stages in one pipeline file (comments and data deps kept)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096
    doc = rt.load(path.read_text())
    before = json.dumps(doc, default=str)
    for stage, body in (doc.get("stages") or {}).items():
        data = [d for d in body.get("deps") or [] if not is_code_dep(str(d))]
        body["deps"] = [*wanted[stage].code, *data]
        body["params"] = list(wanted[stage].sections)
    if json.dumps(doc, default=str) == before:
        return False
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        rt.dump(doc, f)
    os.replace(tmp, path)
    return True


# ---------------------------------------------------------------------------------------------
# dvc.lock


def git_tracked(root: Path = ROOT) -> set[str] | None:
    """Files tracked by git (relative POSIX paths), or None outside a git work tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return set(filter(None, out.decode().split("\0")))


def resolve_refs(entry: str, params: dict) -> str:
    """dvc.yaml's `${paths.x}` interpolation for the simple `${a.b}` references this project uses."""

    def value(m: re.Match) -> str:
        node = params
        for part in m.group(1).split("."):
            node = node[part]
        return str(node)

    return re.sub(r"\$\{([\w.]+)\}", value, entry)


def _checked(rel: str, tracked: set[str] | None, root: Path) -> bool:
    """Whether a dependency is code-like: every file of it is tracked by git (not data)."""
    if tracked is None:
        return rel.split("/")[0] in PACKAGES
    if rel in tracked:
        return True
    inside = [f for f in tracked if f.startswith(rel.rstrip("/") + "/")]
    p = Path(root) / rel
    if not inside or not p.is_dir():
        return False
    on_disk = {(Path(d) / f).relative_to(root).as_posix() for d, _, files in os.walk(p) for f in files}
    return on_disk <= tracked


def read_lock(lock_file: Path | str = "dvc.lock") -> dict:
    """dvc.lock's `stages:` mapping ({} when there is none yet)."""
    f = Path(lock_file)
    if not f.exists():
        return {}
    try:
        return (yaml.safe_load(f.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as e:
        raise UserError(f"{f}: invalid YAML: {e}") from None


def stale_lock(root: Path = ROOT) -> list[str]:
    """One line per code or params dependency whose entry in dvc.lock differs from the working tree."""
    root = Path(root)
    stages = load_dvc_yaml(root).get("stages") or {}
    lock_file = root / "dvc.lock"
    if not lock_file.exists():
        return ["dvc.lock: missing (run the pipeline: `make pipeline` or `dvc repro`)"]
    lock = read_lock(lock_file)
    params = read_params_file(root / PARAMS_FILE)
    tracked = git_tracked(root)
    problems = []
    for stage, body in stages.items():
        locked = lock.get(stage)
        if locked is None:
            problems.append(f"{stage}: not in dvc.lock (the stage never ran with this dvc.yaml)")
            continue
        if str(locked.get("cmd")) != str(body.get("cmd")):
            problems.append(f"{stage}: cmd {body.get('cmd')!r} differs from dvc.lock's {locked.get('cmd')!r}")
        recorded = {d["path"]: d for d in locked.get("deps") or []}
        for entry in body.get("deps") or []:
            rel = resolve_refs(str(entry), params).rstrip("/")
            if not _checked(rel, tracked, root):
                continue
            if rel not in recorded:
                problems.append(f"{stage}: {rel} is a dependency but not in dvc.lock")
            elif not (root / rel).exists():
                problems.append(f"{stage}: {rel} is in dvc.lock but missing from the working tree")
            elif dvc_md5(root / rel) != recorded[rel].get("md5"):
                problems.append(f"{stage}: {rel} changed since dvc.lock was written")
        locked_params = (locked.get("params") or {}).get(PARAMS_FILE, {})
        for key in body.get("params") or []:
            node = params
            for part in str(key).split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if str(key) not in locked_params:
                problems.append(f"{stage}: params.yaml {key} is a dependency but not in dvc.lock")
                continue
            now, then = flatten({str(key): node}), flatten({str(key): locked_params[str(key)]})
            for k in sorted(set(now) | set(then)):
                if now.get(k, "<absent>") != then.get(k, "<absent>"):
                    problems.append(
                        f"{stage}: params.yaml {k} is {now.get(k, '<absent>')!r}, "
                        f"dvc.lock has {then.get(k, '<absent>')!r}"
                    )
    return problems


# ---------------------------------------------------------------------------------------------
# dvc status


def stale_stages(root: Path = Path("."), stages: list[str] | None = None) -> dict[str, list]:
    """`dvc status` of the default pipeline: stage -> what changed since dvc.lock recorded it (empty: all up to
    date). The target keeps the other pipeline files out (the learning curve's stage, stale or never run); given
    `stages`, only those and what they depend on (one task's stages and the shared ones)."""
    targets = [f"{DEFAULT_PIPELINE}:{s}" for s in stages] if stages else [str(DEFAULT_PIPELINE)]
    extra = ["--with-deps"] if stages else []
    res = subprocess.run(dvc_command("status", "--json", *extra, *targets), cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        raise UserError(f"dvc status failed: {last[0]}")
    try:
        status = json.loads(res.stdout or "{}")
    except ValueError:
        raise UserError(f"dvc status printed something that is not JSON: {res.stdout[:200]!r}") from None
    return {k: v for k, v in status.items() if v}


def describe_change(changes: list) -> str:
    """The first change `dvc status --json` reports for a stage, e.g. `changed deps: data/models/classifier
    (modified)`."""
    for change in changes:
        if isinstance(change, dict):
            for kind, what in change.items():
                if isinstance(what, dict) and what:
                    path, how = next(iter(what.items()))
                    return f"{kind}: {path} ({how})"
                return str(kind)
        return str(change)
    return "changed"


def describe_stale(stale: dict[str, list]) -> str:
    """`N stage(s) out of date (a, b; a: <its first change>)`."""
    first = next(iter(stale))
    return f"{len(stale)} stage(s) out of date ({', '.join(stale)}; {first}: {describe_change(stale[first])})"


def require_current_evaluation(root: Path = Path("."), stages: list[str] | None = None) -> None:
    """Refuse unless DVC reports every stage (or every one of `stages` and what they depend on) up to date, so the
    evaluation and lineage describe the workspace."""
    stale = stale_stages(root, stages)
    if stale:
        raise UserError(
            f"the evaluation is not evidence for the current artifacts: dvc status reports {describe_stale(stale)}; "
            "run `dvc repro` (or `make pipeline`), then promote"
        )
