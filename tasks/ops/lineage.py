"""What a model was built from, and whether the workspace would build the same thing again.

The *fingerprint* of a pipeline run is three digests taken from dvc.lock (DVC's own record of
every stage's inputs):

- `data`: the md5 of every stage input that no stage produces and that is not code (raw inputs such as
  `data/user`, `dvc add`-ed files);
- `code`: the md5 of every project source file a stage depends on (dvc.yaml's generated code deps);
- `params`: every stage's params sections, as DVC recorded their values.

Promotion tags each registered version with it (`lineage.data`, `lineage.code`, `lineage.params`), with the md5 of
each data input (`lineage.inputs`, JSON) and what `precision: auto` chose (`precision`, JSON), and logs the whole
dvc.lock beside the model (`lineage/dvc.lock` in the promote run: every stage's deps and outs, which `lmforge verify`
compares a rebuild with) instead of one tag per entry.
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

from tasks.ops.dag import describe_stale, is_code_dep, read_lock, stale_stages
from tasks.ops.registry import ALIAS, current_version
from tasks.shared.datasets import dir_md5, dvc_entries, dvc_md5
from tasks.shared.io import read_json

KINDS = ("data", "code", "params")
TAG = "lineage.{}"
INPUTS_TAG = "lineage.inputs"
"""JSON: every data input of dvc.lock (no stage writes it, not code) -> its DVC md5: what the version was built from."""
PRECISION_TAG = "precision"
"""JSON: what `precision: auto` chose for each model (its stage, or a baseline's name): `lmforge verify` replays it."""
DIRTY_TAG = "git_dirty"
"""The code inputs (and dvc.yaml) that differed from `git_commit` when the version was registered, or `no`."""
PARAMS_ARTIFACT = "lineage/params.yaml"
"""In the promote run: the exact params.yaml the version was built with (`params_sha256` is its digest)."""
INPUTS_ARTIFACT = "lineage/inputs.json"
"""In the promote run: `data_files()`, the md5 of every file of every data input."""
LOCK_ARTIFACT = "lineage/dvc.lock"
"""In the promote run: the dvc.lock the version was built under (read back with `lock_record`)."""


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


def precisions(metrics_dir: Path, stages: list[str]) -> dict[str, str]:
    """What `precision: auto` chose for each model, from the stages' metrics: a stage's own `precision` (by stage),
    and its `baselines.<name>.precision` (by name)."""
    chosen = {}
    for stage in stages:
        f = Path(metrics_dir) / f"{stage}.json"
        metrics = read_json(f) if f.is_file() else {}
        if isinstance(metrics.get("precision"), str):
            chosen[stage] = metrics["precision"]
        for name, body in (metrics.get("baselines") or {}).items():
            if isinstance(body, dict) and isinstance(body.get("precision"), str):
                chosen[name] = body["precision"]
    return chosen


def tags(lock_file: Path | str = "dvc.lock") -> dict[str, str]:
    """The fingerprint and the data inputs' md5 (`INPUTS_TAG`) as registry tags."""
    return {
        **{TAG.format(k): v for k, v in fingerprint(lock_file).items()},
        INPUTS_TAG: json.dumps(inputs(lock_file)["data"], sort_keys=True),
    }


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


def lock_record(lock_file: Path | str = Path("dvc.lock")) -> dict[str, dict[str, dict[str, str]]]:
    """Stage -> deps/outs -> path -> md5 of every entry dvc.lock records with an md5."""
    record: dict[str, dict[str, dict[str, str]]] = {}
    for stage, body in read_lock(lock_file).items():
        for kind in ("deps", "outs"):
            for item in body.get(kind) or []:
                if "md5" in item:
                    record.setdefault(stage, {}).setdefault(kind, {})[item["path"]] = item["md5"]
    return record
