"""Which exact data a run read: each input's DVC hash, logged as an MLflow dataset (`mlflow.log_input`).

A user input that `dvc add` tracks (the file itself or a folder above it has a `.dvc` file) is named by the
md5 that `.dvc` file records, so the MLflow run and `dvc pull` point at the same bytes. An input DVC does
not track yet gets the md5 of its content, which is what `dvc add` would record for a single file (for
several files: the md5 of their sorted `md5 path` lines). The default stdlib data is named by the md5 of
the stage output built from it, which is what dvc.lock records for that output.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.shared.io import expand_inputs, user_inputs


def file_md5(path: Path | str, block: int = 1 << 22) -> str:
    """The md5 of a file's bytes (DVC 3's hash of a file), read in blocks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def dvc_entries(path: Path) -> list[dict[str, str]]:
    """A folder's files as DVC 3 lists them in its `.dir` object: `{md5, relpath}`, sorted by relpath."""
    entries = [
        {"md5": file_md5(Path(d) / f), "relpath": (Path(d) / f).relative_to(path).as_posix()}
        for d, _, files in os.walk(path)
        for f in files
    ]
    return sorted(entries, key=lambda e: e["relpath"])


def dir_md5(entries: list[dict[str, str]]) -> str:
    """The md5 DVC 3 records for a folder of these `dvc_entries`: `<md5 of the sorted entry list>.dir`."""
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dvc_md5(path: Path | str) -> str:
    """The md5 DVC 3 records for a file, or for a folder (`<md5 of its sorted entry list>.dir`)."""
    path = Path(path)
    return file_md5(path) if path.is_file() else dir_md5(dvc_entries(path))


def dvc_file(path: Path) -> Path | None:
    """The `.dvc` file that tracks `path`: its own, or that of the nearest folder above it that has one."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        if p.name and (candidate := p.with_name(p.name + ".dvc")).is_file():
            return candidate
    return None


def _tracked_md5(dvc: Path) -> str | None:
    try:
        outs = (yaml.safe_load(dvc.read_text()) or {}).get("outs") or []
    except (OSError, yaml.YAMLError):
        return None
    return outs[0].get("md5") if outs and isinstance(outs[0], dict) else None


@dataclass(frozen=True)
class InputDigest:
    digest: str
    files: int
    bytes: int
    tracked: list[str]
    """The `.dvc` files that name this input's content."""
    untracked: list[str]
    """Its files that no `.dvc` file covers (hashed here)."""


def input_digest(spec: str | list[str]) -> InputDigest:
    """The DVC hash of an input spec (files, folders, globs): one tracked target's md5 as DVC records it,
    else the md5 of the sorted `md5 path` lines of its parts."""
    files = expand_inputs(spec)
    parts: dict[str, str] = {}
    tracked, untracked = [], []
    for f in files:
        dvc = dvc_file(f)
        md5 = _tracked_md5(dvc) if dvc else None
        if md5:
            if str(dvc) not in parts:
                parts[str(dvc)] = md5
                tracked.append(str(dvc))
        else:
            parts[str(f)] = file_md5(f)
            untracked.append(str(f))
    if len(parts) == 1:
        digest = next(iter(parts.values()))
    else:
        digest = hashlib.md5("".join(f"{md5}  {p}\n" for p, md5 in sorted(parts.items())).encode()).hexdigest()
    return InputDigest(digest, len(files), sum(f.stat().st_size for f in files), tracked, untracked)


def log_dataset(tracker, name: str, spec: str | list[str], output: Path | str, context: str) -> InputDigest:
    """Log input `name` as an MLflow dataset named by its DVC hash (the stdlib default: by its output's
    md5); prints a hint for files DVC does not track. Returns the digest."""
    specs = user_inputs(spec)
    if not specs:  # the stdlib default
        d = InputDigest(file_md5(output), 1, Path(output).stat().st_size, [], [])
        sources = [str(Path(output).resolve())]
    else:
        d = input_digest(specs)
        sources = [str(Path(s).resolve()) for s in specs]
        if d.untracked:
            more = f" and {len(d.untracked) - 3} more" if len(d.untracked) > 3 else ""
            print(
                f"ingest: {name}: not tracked by DVC: {', '.join(d.untracked[:3])}{more} "
                "(`dvc add` them so `dvc push` keeps this version)",
                flush=True,
            )
    tags = {"dvc.tracked": str(not d.untracked).lower(), "files": str(d.files), "bytes": str(d.bytes)}
    tracker.log_input(
        name=name if specs else f"{name} (stdlib)",
        sources=sources,
        digest=d.digest,
        context=context,
        tags=tags,
    )
    return d


def log_stage_inputs(tracker, inputs: dict[str, Path | str], context: str) -> None:
    """Log each stage output a stage reads (name -> file or folder) as an MLflow dataset of its run, named by its
    DVC md5 (what dvc.lock records for that output), with its file count and bytes; a missing one is skipped
    (the stage itself says what is wrong)."""
    for name, path in inputs.items():
        path = Path(path)
        if not path.exists():
            continue
        files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
        tags = {"files": str(len(files)), "bytes": str(sum(f.stat().st_size for f in files))}
        tracker.log_input(name=name, sources=[str(path.resolve())], digest=dvc_md5(path), context=context, tags=tags)


def _in_git(paths: list[Path], root: Path) -> set[Path]:
    import subprocess

    res = subprocess.run(["git", "ls-files", "-z", "--", *map(str, paths)], cwd=root, capture_output=True)
    return {(root / p).absolute() for p in res.stdout.decode().split("\0") if p} if res.returncode == 0 else set()


def untracked_inputs(specs: list, root: Path = Path(".")) -> list[Path]:
    """What `dvc add` should track among the user inputs `specs` (paths, folders, globs; `stdlib` is skipped):
    each folder or file inside `root` that no `.dvc` file covers and git does not track. A folder that
    already holds tracked files is not added whole: its other files are, one by one."""
    root = Path(root).absolute()
    out: list[Path] = []
    for item in user_inputs(*specs):
        path = Path(item)
        whole = path.is_dir() and not any(path.rglob("*.dvc")) and not _in_git([path], root)
        targets = [path] if whole else expand_inputs(item)
        for t in targets:
            a = t.absolute()
            if root in a.parents and dvc_file(a) is None and a not in out:
                out.append(a)
    git = _in_git(out, root) if out else set()
    return [p.relative_to(root) for p in out if p not in git and not any(g in p.parents for g in git)]
