"""What a model was built from, and whether the workspace would build the same thing again.

The *fingerprint* of a pipeline run is three digests taken from dvc.lock (DVC's own record of
every stage's inputs):

- `data`: the md5 of every stage input that no stage produces and that is not code (raw inputs such as
  `data/user`, `dvc add`-ed files);
- `code`: the md5 of every project source file a stage depends on (dvc.yaml's generated code deps);
- `params`: every stage's params sections, as DVC recorded their values.

Promotion tags each registered version with it (`lineage.data`, `lineage.code`, `lineage.params`).
`lmforge retrain` compares the workspace's fingerprint with the champion's: when `dvc status` reports
nothing stale and all three are equal, a run would rebuild the champion, so it skips. Outputs are not
part of the fingerprint (training need not be bit-exact), and neither is anything DVC does not track
(a README edit, a comment in params.yaml outside a stage's section, the git commit).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tasks.ops.dag import describe_stale, dir_md5, dvc_entries, dvc_md5, is_code_dep, read_lock, stale_stages
from tasks.ops.registry import ALIAS, current_version
from tasks.shared.io import read_json

KINDS = ("data", "code", "params")
TAG = "lineage.{}"
PRECISION_TAG = "precision.{}"
"""What `precision: auto` chose for a model (its stage, or a baseline's name): `lmforge verify` replays it."""
DIRTY_TAG = "git_dirty"
"""The code inputs (and dvc.yaml) that differed from `git_commit` when the version was registered, or `no`."""
PARAMS_ARTIFACT = "lineage/params.yaml"
"""In the promote run: the exact params.yaml the version was built with (`params_sha256` is its digest)."""
INPUTS_ARTIFACT = "lineage/inputs.json"
"""In the promote run: `data_files()`, the md5 of every file of every data input."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def inputs(lock_file: Path | str = "dvc.lock") -> dict[str, dict]:
    """{data, code, params} of dvc.lock: path -> md5 of every stage input no stage produces, split into code and
    data (see the module docstring), and stage -> its params."""
    stages = read_lock(lock_file)
    produced = {o["path"] for body in stages.values() for o in body.get("outs") or []}
    parts: dict[str, dict] = {kind: {} for kind in KINDS}
    for stage, body in stages.items():
        for dep in body.get("deps") or []:
            if dep["path"] not in produced:
                parts["code" if is_code_dep(dep["path"]) else "data"][dep["path"]] = dep.get("md5") or dep.get("hash")
        parts["params"][stage] = body.get("params") or {}
    return parts


def fingerprint(lock_file: Path | str = "dvc.lock") -> dict[str, str]:
    """{data, code, params} digests of the inputs dvc.lock records (see the module docstring)."""
    parts = inputs(lock_file)
    return {kind: _digest(parts[kind]) for kind in KINDS}


def data_files(lock_file: Path | str = "dvc.lock", root: Path = Path(".")) -> dict[str, dict[str, str]]:
    """Every data input of dvc.lock (a file or a folder) -> the md5 of each file in it now (a file: under "").

    What `lmforge verify` restores a version's inputs from, file by file (from git, the workspace or the DVC
    cache); an input whose md5 differs from dvc.lock's is left out (it is not what the stages read)."""
    out = {}
    for path, md5 in inputs(lock_file)["data"].items():
        p = Path(root) / path
        if p.is_file():
            files = {"": dvc_md5(p)}
            now = files[""]
        elif p.is_dir():
            entries = dvc_entries(p)
            files, now = {e["relpath"]: e["md5"] for e in entries}, dir_md5(entries)
        else:
            continue
        if now == md5:
            out[path] = files
    return out


def uncommitted_code(lock_file: Path | str = "dvc.lock", root: Path = Path(".")) -> list[str] | None:
    """The code inputs of dvc.lock, and dvc.yaml, that differ from git's HEAD (changed or never committed);
    None outside a git work tree."""
    code = [*sorted(inputs(lock_file)["code"]), "dvc.yaml"]
    try:
        res = subprocess.run(
            ["git", "status", "--porcelain", "-z", "--untracked-files=all", "--", *code],
            cwd=root,
            capture_output=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({entry[3:] for entry in res.stdout.decode().split("\0") if len(entry) > 3})


def precision_tags(metrics_dir: Path, stages: list[str]) -> dict[str, str]:
    """What `precision: auto` chose for each model, from the stages' metrics: a stage's own `precision`, and its
    `baselines.<name>.precision`."""
    tags = {}
    for stage in stages:
        f = Path(metrics_dir) / f"{stage}.json"
        metrics = read_json(f) if f.is_file() else {}
        if isinstance(metrics.get("precision"), str):
            tags[PRECISION_TAG.format(stage)] = metrics["precision"]
        for name, body in (metrics.get("baselines") or {}).items():
            if isinstance(body, dict) and isinstance(body.get("precision"), str):
                tags[PRECISION_TAG.format(name)] = body["precision"]
    return tags


def tags(lock_file: Path | str = "dvc.lock") -> dict[str, str]:
    """The fingerprint as registry tags."""
    return {TAG.format(k): v for k, v in fingerprint(lock_file).items()}


@dataclass
class Comparison:
    changed: bool
    reason: str
    champion: str | None = None
    """The champion's version, if there is one."""


def compare_with_champion(client, model: str, root: Path = Path("."), stages: list[str] | None = None) -> Comparison:
    """Would a run of the pipeline in `root` rebuild @champion? (`dvc status` first — of `stages` and what they
    depend on, when given: the enabled tasks' — then the fingerprints.)"""
    stale = stale_stages(root, stages)
    if stale:
        return Comparison(True, f"dvc status reports {describe_stale(stale)}")
    mv = current_version(client, model)
    if mv is None:
        return Comparison(True, f"registered model {model!r} has no @{ALIAS} yet")
    recorded = {k: mv.tags.get(TAG.format(k)) for k in KINDS}
    if not all(recorded.values()):
        return Comparison(
            True,
            f"{model} v{mv.version} (@{ALIAS}) records no lineage fingerprint (registered by an older lmforge)",
            str(mv.version),
        )
    now = fingerprint(Path(root) / "dvc.lock")
    differ = [k for k in KINDS if recorded[k] != now[k]]
    if differ:
        return Comparison(
            True, f"{' and '.join(differ)} differ from the lineage of {model} v{mv.version} (@{ALIAS})", str(mv.version)
        )
    return Comparison(
        False, f"data, code and params equal the lineage of {model} v{mv.version} (@{ALIAS})", str(mv.version)
    )


def dvc_lineage(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every stage dependency and output recorded in dvc.lock."""
    return {
        f"dvc.{stage}.{kind}.{item['path']}": item["md5"]
        for stage, body in read_lock(lock_file).items()
        for kind in ("deps", "outs")
        for item in body.get(kind) or []
        if "md5" in item
    }
