"""verify: rebuild a registered version from its own lineage and compare what it would register, byte for byte.

`lmforge verify VERSION` reads what `lmforge promote` recorded on the version (tasks/ops/lineage.py): the git
commit, the exact params.yaml (an artifact of the promote run, checked against `params_sha256`), the md5 of
every input file, what `precision: auto` chose for each model, and the dvc.lock it was built under (an artifact of
the promote run: the md5 of every stage's deps and outputs).
It checks out the commit in a temporary git worktree, restores the inputs there (from git, the workspace or
the DVC cache, by md5), and runs `dvc repro --force --no-run-cache --no-commit` on the stage that writes the
registered variant and everything upstream of it: every stage trains (the run-cache restores nothing, and
the worktree has a cache of its own that nothing is committed to), replaying the recorded precisions
(engine.runtime.PRECISION_REPLAY_ENV), with an MLflow store of its own so the rebuild logs nothing into
yours. It then writes the model `promote` would log (`mlflow.pyfunc.save_model`, the same arguments) and
compares the sha256 of every file with the registered version's.

Every file is compared except `MLmodel`, MLflow's record of the logging itself (run id, model id, time).
When a file differs, the first stage (in dvc.yaml order) whose cached outputs differ from the recorded
dvc.lock is named: where the rebuild went another way. Metrics and plots (`cache: false`) are not compared:
they hold timings. The worktree is removed at the end, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tasks.ops.dag import dvc_command, is_code_dep, load_dvc_yaml, read_lock, resolve_refs, stage_names
from tasks.ops.lineage import DIRTY_TAG, INPUTS_ARTIFACT, LOCK_ARTIFACT, PARAMS_ARTIFACT, PRECISION_TAG, lock_record
from tasks.shared.config.base import read_params_file
from tasks.shared.config.params import Params
from tasks.shared.datasets import dvc_md5
from tasks.shared.engine.runtime import PRECISION_REPLAY_ENV
from tasks.shared.errors import UserError
from tasks.shared.tracking import PARAMS_ENV, PARENT_RUN_ENV, setup_tracking
from tasks.shared.variants import folders as variant_folders

LEGACY_DVC_TAG = "dvc."
"""Versions registered by an older lmforge carry dvc.lock as tags (`dvc.<stage>.<deps|outs>.<path>`: md5)."""
LEGACY_PRECISION_TAG = "precision."
"""... and each model's precision as a tag of its own (`precision.<model>`)."""

NOT_COMPARED = frozenset({"MLmodel", "input_example.json", "serving_input_example.json"})
"""Not compared: MLflow's record of the logging (run id, model id, creation time, the temp folder logged) and the
input example it saves beside the model (the code's example texts, not the model: older versions have none)."""


@dataclass
class Recorded:
    """What the registry says a version was built from."""

    name: str
    version: str
    commit: str
    variant: str
    params_text: str
    """The params.yaml it was built with."""
    inputs: dict[str, dict[str, str]] | None
    """Data input -> relpath -> md5 (`lineage.data_files`); None when the version predates it."""
    precisions: dict[str, str]
    """Model -> the precision `precision: auto` chose."""
    lock: dict[str, dict[str, dict[str, str]]]
    """Stage -> deps/outs -> path -> md5, as dvc.lock recorded them."""


@dataclass
class Verdict:
    reproduced: bool
    compared: int
    """Files compared."""
    first_file: str | None = None
    """The first file (sorted) that differs, is missing or is extra."""
    detail: str = ""
    first_stage: str | None = None
    """The first stage (dvc.yaml order) whose cached outputs differ from the recorded dvc.lock."""
    seconds: float = 0.0


def recorded_lock(run_id: str, tmp: Path) -> dict[str, dict[str, dict[str, str]]]:
    """The promote run's copy of dvc.lock as stage -> deps/outs -> path -> md5 ({} when the run has none)."""
    text = _artifact_text(run_id, LOCK_ARTIFACT, tmp)
    if text is None:
        return {}
    lock_file = tmp / "recorded-dvc.lock"
    lock_file.write_text(text, encoding="utf-8")
    return lock_record(lock_file)


def legacy_lineage(tags: dict[str, str]) -> tuple[dict[str, dict[str, dict[str, str]]], dict[str, str]]:
    """The lock record and precisions of a version registered before the promote run kept dvc.lock: its
    `dvc.<stage>.<deps|outs>.<path>` md5 tags and its `precision.<model>` tags."""
    lock: dict[str, dict[str, dict[str, str]]] = {}
    chosen = {}
    for key, value in tags.items():
        if key.startswith(LEGACY_DVC_TAG) and key.count(".") >= 3:
            _, stage, kind, path = key.split(".", 3)
            lock.setdefault(stage, {}).setdefault(kind, {})[path] = value
        elif key.startswith(LEGACY_PRECISION_TAG):
            chosen[key.removeprefix(LEGACY_PRECISION_TAG)] = value
    return lock, chosen


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=300)


def recorded(client, name: str, version: str, root: Path, tmp: Path) -> Recorded:
    """The version's lineage, or a one-line UserError when it cannot be rebuilt from it."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise UserError(f"no version {version!r} of registered model {name!r}") from None
    tags = dict(mv.tags)
    commit = tags.get("git_commit", "")
    legacy_lock, legacy_precisions = legacy_lineage(tags)
    lock = recorded_lock(tags.get("mlflow_promote_run_id", ""), tmp) or legacy_lock
    if not commit or not lock:
        raise UserError(f"{name} v{version} records no lineage (registered by an older lmforge): nothing to rebuild")
    if commit == "unknown" or git(root, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise UserError(f"{name} v{version} was built from commit {commit[:12]!r}, which this repository does not have")
    dirty = tags.get(DIRTY_TAG, "no")
    if dirty not in ("no", "unknown"):
        raise UserError(
            f"{name} v{version} was built from uncommitted code ({dirty}): commit {commit[:12]} cannot rebuild it"
        )
    precisions = json.loads(tags.get(PRECISION_TAG) or "{}") or legacy_precisions
    return Recorded(
        name,
        version,
        commit,
        tags.get("variant", ""),
        params_text(tags, f"{name} v{version}", root, tmp),
        _artifact_json(tags.get("mlflow_promote_run_id", ""), INPUTS_ARTIFACT, tmp),
        precisions,
        lock,
    )


def params_text(tags: dict[str, str], shown: str, root: Path, tmp: Path) -> str:
    """The exact params.yaml of the version: the promote run's copy, else the commit's when its sha256 matches."""
    want = tags.get("params_sha256", "")
    text = _artifact_text(tags.get("mlflow_promote_run_id", ""), PARAMS_ARTIFACT, tmp)
    if text is None:
        text = git(root, "show", f"{tags['git_commit']}:params.yaml").stdout
    if hashlib.sha256(text.encode()).hexdigest() != want:
        raise UserError(
            f"the params.yaml of {shown} is not recorded, and commit {tags['git_commit'][:12]}'s "
            f"differs from it (sha256 {want[:12]}): it was edited without a commit"
        )
    return text


def _artifact_text(run_id: str, path: str, tmp: Path) -> str | None:
    from mlflow.exceptions import MlflowException

    import mlflow

    if not run_id:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(tmp / "lineage"))
    except (MlflowException, OSError):
        return None
    return Path(local).read_text(encoding="utf-8")


def _artifact_json(run_id: str, path: str, tmp: Path) -> dict | None:
    text = _artifact_text(run_id, path, tmp)
    return None if text is None else json.loads(text)


@contextmanager
def worktree(root: Path, commit: str, path: Path) -> Iterator[Path]:
    """`commit` checked out at `path` (a detached git worktree), removed again however the block ends."""
    res = git(root, "worktree", "add", "--detach", str(path), commit)
    if res.returncode != 0:
        raise UserError(f"git worktree add {commit[:12]} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    try:
        yield path
    finally:
        git(root, "worktree", "remove", "--force", str(path))
        git(root, "worktree", "prune")


# --- preparing the rebuild -------------------------------------------------------------------------


def check_code(wt: Path, rec: Recorded) -> None:
    """Every code input in the worktree must be what the recorded stages read (else: uncommitted code)."""
    for stage, kinds in rec.lock.items():
        for path, md5 in (kinds.get("deps") or {}).items():
            if is_code_dep(path) and (not (wt / path).exists() or dvc_md5(wt / path) != md5):
                raise UserError(
                    f"{rec.name} v{rec.version} was built from code that commit {rec.commit[:12]} does not hold: "
                    f"{path} (a dependency of {stage}) differs"
                )


def _dvc_cache(root: Path) -> Path:
    """The workspace's DVC cache folder (`dvc cache dir`)."""
    res = subprocess.run(dvc_command("cache", "dir"), cwd=root, capture_output=True, text=True)
    return Path(res.stdout.strip()) if res.returncode == 0 and res.stdout.strip() else root / ".dvc" / "cache"


def cache_path(cache: Path, md5: str) -> Path:
    """Where DVC 3's cache keeps a file of this md5 (`files/md5/<2>/<30>`, its documented layout)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def restore_inputs(wt: Path, root: Path, rec: Recorded) -> None:
    """Make every data input in the worktree what the version's stages read, file by file, by md5: from the
    commit, else the workspace, else the DVC cache."""
    deps = {p: md5 for kinds in rec.lock.values() for p, md5 in (kinds.get("deps") or {}).items()}
    produced = {p for kinds in rec.lock.values() for p in kinds.get("outs") or {}}
    cache = _dvc_cache(root)
    for path, md5 in deps.items():
        if path in produced or is_code_dep(path) or ((wt / path).exists() and dvc_md5(wt / path) == md5):
            continue
        files = (rec.inputs or {}).get(path)
        if files is None:  # a version from before the listing: the workspace's copy, if it is still the same
            files = {"": md5} if (root / path).is_file() else None
        if files is None and (root / path).is_dir() and dvc_md5(root / path) == md5:
            shutil.rmtree(wt / path, ignore_errors=True)
            shutil.copytree(root / path, wt / path)
            continue
        if files is None:
            raise UserError(f"input {path} (md5 {md5}) of {rec.name} v{rec.version} is not in the workspace")
        _restore_files(wt / path, root / path, files, cache)
        if dvc_md5(wt / path) != md5:
            raise UserError(f"input {path}: restored, but its md5 is not {md5}")


def _restore_files(dst: Path, src: Path, files: dict[str, str], cache: Path) -> None:
    wanted = {(dst / rel if rel else dst): (src / rel if rel else src, md5) for rel, md5 in files.items()}
    if dst.is_dir():
        for f in [f for f in dst.rglob("*") if f.is_file() and f not in wanted]:
            f.unlink()
    for target, (workspace, md5) in wanted.items():
        if target.is_file() and dvc_md5(target) == md5:
            continue
        source = next((s for s in (workspace, cache_path(cache, md5)) if s.is_file() and dvc_md5(s) == md5), None)
        if source is None:
            raise UserError(
                f"input {workspace} (md5 {md5}) is neither in the workspace nor in the DVC cache {cache}: "
                "`dvc pull` it, then verify again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


# --- the rebuild -----------------------------------------------------------------------------------


def producer(rec: Recorded, folder: Path) -> str:
    """The stage whose recorded outputs hold `folder` (the registered variant)."""
    want = folder.as_posix()
    for stage, kinds in rec.lock.items():
        if any(want == out or want.startswith(out.rstrip("/") + "/") for out in kinds.get("outs") or {}):
            return stage
    raise UserError(f"{rec.name} v{rec.version}: no recorded stage writes {want} (variant {rec.variant})")


def rebuild(wt: Path, stage: str, rec: Recorded, store: Path) -> None:
    """`dvc repro` of `stage` and everything upstream in the worktree: every stage trains, its output streams."""
    env = {k: v for k, v in os.environ.items() if k not in (PARENT_RUN_ENV, PARAMS_ENV)}
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"sqlite:///{store}",  # the rebuild's runs go to a store of its own
            PRECISION_REPLAY_ENV: json.dumps(rec.precisions),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # dvc.yaml's `python`
        }
    )
    cmd = dvc_command("repro", "--force", "--no-run-cache", "--no-commit", stage)
    print(f"verify: {' '.join(['dvc', *cmd[3:]])} in {wt}", flush=True)
    res = subprocess.run(cmd, cwd=wt, env=env)
    if res.returncode != 0:
        raise UserError(
            f"the rebuild failed: dvc repro {stage} exited with code {res.returncode} (its output is above)"
        )


def model_files(folder: Path) -> dict[str, str]:
    """relpath -> sha256 of every file of a saved MLflow model, except NOT_COMPARED."""
    out = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel not in NOT_COMPARED:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def registered_files(client, rec: Recorded, tmp: Path) -> dict[str, str]:
    """The registered version's files and their sha256."""
    import mlflow

    uri = client.get_model_version_download_uri(rec.name, rec.version)
    return model_files(Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "registered"))))


def rebuilt_files(wt: Path, params: Params, folder: Path, tmp: Path) -> dict[str, str]:
    """The files of the model `lmforge promote` would log from the rebuilt outputs, and their sha256."""
    import mlflow
    from tasks.ops.promote import pyfunc_model, write_servable

    bundle = tmp / "bundle" / "bundle"  # promote's temp folder is named `bundle` too
    write_servable(params, folder, bundle, root=wt)
    mlflow.pyfunc.save_model(str(tmp / "rebuilt"), **pyfunc_model(bundle, root=wt))
    return model_files(tmp / "rebuilt")


def first_difference(registered: dict[str, str], rebuilt: dict[str, str]) -> tuple[str, str] | None:
    """The first file (sorted) that differs, is missing or is extra, and how."""
    for rel in sorted(set(registered) | set(rebuilt)):
        if rel not in rebuilt:
            return rel, "registered, but the rebuild does not produce it"
        if rel not in registered:
            return rel, "produced by the rebuild, but not registered"
        if registered[rel] != rebuilt[rel]:
            return rel, f"sha256 {registered[rel][:12]} registered, {rebuilt[rel][:12]} rebuilt"
    return None


def cached_outs(dvc_yaml: dict, params: dict) -> dict[str, list[str]]:
    """Stage -> its outputs that DVC caches (the artifacts; `cache: false` ones are metrics, plots, reports)."""
    out = {}
    for stage, body in (dvc_yaml.get("stages") or {}).items():
        paths = []
        for entry in body.get("outs") or []:
            path, opts = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            if (opts or {}).get("cache", True):
                paths.append(resolve_refs(str(path), params).rstrip("/"))
        out[stage] = paths
    return out


def first_stage(order: list[str], cached: dict[str, list[str]], recorded_lock: dict, rebuilt_lock: dict) -> str | None:
    """The first stage, in `order`, whose cached outputs' md5 in `rebuilt_lock` differ from `recorded_lock`'s."""
    for stage in order:
        want = (recorded_lock.get(stage) or {}).get("outs") or {}
        got = {o["path"]: o.get("md5") for o in (rebuilt_lock.get(stage) or {}).get("outs") or []}
        for path in cached.get(stage, []):
            if path in want and got.get(path) != want[path]:
                return f"{stage} ({path})"
    return None


def upstream(stage: str, lock: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """`stage` and every stage it depends on, through the recorded deps and outs."""

    def feeds(a: str, b: str) -> bool:
        return any(
            d == o or d.startswith(o.rstrip("/") + "/") or o.startswith(d.rstrip("/") + "/")
            for o in (lock.get(a) or {}).get("outs") or {}
            for d in (lock.get(b) or {}).get("deps") or {}
        )

    seen, todo = {stage}, [stage]
    while todo:
        b = todo.pop()
        for a in lock:
            if a not in seen and feeds(a, b):
                seen.add(a)
                todo.append(a)
    return list(seen)


# --- the command -----------------------------------------------------------------------------------


def run(params: Params, version: str, root: Path = Path(".")) -> Verdict:
    """Rebuild `version` of the registered model from its lineage and compare it with the registered one."""
    from mlflow import MlflowClient

    start, root = time.perf_counter(), Path(root).resolve()
    setup_tracking(params.tracking)
    client, name = MlflowClient(), params.tracking.registered_model
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-verify-"))
    try:
        rec = recorded(client, name, version, root, tmp)
        print(f"verify: {name} v{version} ({rec.variant}) from commit {rec.commit[:12]}", flush=True)
        with worktree(root, rec.commit, tmp / "source") as wt:
            (wt / "params.yaml").write_text(rec.params_text, encoding="utf-8")
            check_code(wt, rec)
            restore_inputs(wt, root, rec)
            verdict = _rebuild_and_compare(client, wt, rec, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verdict.seconds = time.perf_counter() - start
    return verdict


def _rebuild_and_compare(client, wt: Path, rec: Recorded, tmp: Path) -> Verdict:
    """Rebuild the variant's stage (and what it needs) in `wt`, then compare the model promote would log with
    the registered one; on a difference, name the first stage that went another way."""
    from tasks.shared.config.params import load_params

    wt_params = load_params(wt / "params.yaml")
    folder = variant_folders(wt_params.paths).get(rec.variant)
    if folder is None:
        raise UserError(f"{rec.name} v{rec.version}: variant {rec.variant!r} is not one this commit builds")
    stage = producer(rec, folder)
    rebuild(wt, stage, rec, tmp / "mlflow.db")
    registered = registered_files(client, rec, tmp)
    diff = first_difference(registered, rebuilt_files(wt, wt_params, folder, tmp))
    if diff is None:
        return Verdict(True, len(registered))
    order = [s for s in stage_names(wt) if s in upstream(stage, rec.lock)]
    cached = cached_outs(load_dvc_yaml(wt), read_params_file(wt / "params.yaml"))
    return Verdict(
        False, len(registered), diff[0], diff[1], first_stage(order, cached, rec.lock, read_lock(wt / "dvc.lock"))
    )
