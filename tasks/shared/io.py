"""Workspace I/O shared by the stages: the one atomic writer (files and folders), tables, JSON.

Every stage output goes through `atomic_file` or `atomic_dir`: the content is written under a
temporary name beside the target and renamed into place only when complete, so an interrupted
stage never leaves an output that looks valid. Leftovers of a killed writer are removed the next
time anything writes that target.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from tasks.shared.errors import UserError

TABLE_FORMATS = (".txt", ".md", ".jsonl", ".csv", ".parquet")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    """Temporary siblings of `target` left by a writer that no longer runs (killed, OOM)."""
    for p in target.parent.glob(f".{target.name}.*-*-*"):
        kind, pid = p.name[len(target.name) + 2 :].split("-")[:2]
        if kind in ("tmp", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            _remove(p)


@contextmanager
def _atomic(target: Path | str, directory: bool) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(target)
    prefix = f".{target.name}.tmp-{os.getpid()}-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp make private files; outputs are not
    try:
        yield tmp
        if directory and target.exists():
            # A folder cannot replace a folder in one rename: move the old one aside first. An
            # interruption between the two renames leaves no target at all, never a partial one.
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    finally:
        _remove(tmp)


def atomic_file(target: Path | str) -> AbstractContextManager[Path]:
    """`with atomic_file(t) as tmp:` write `tmp`; it replaces `t` only if the block succeeds."""
    return _atomic(target, directory=False)


def atomic_dir(target: Path | str) -> AbstractContextManager[Path]:
    """`with atomic_dir(t) as tmp:` fill folder `tmp`; it replaces folder `t` only if the block succeeds."""
    return _atomic(target, directory=True)


def write_json(path: Path | str, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: Path | str, rows: Iterable[dict], columns: list[str]) -> None:
    """Rows as CSV with a header (plot data that `dvc plots` reads)."""
    with atomic_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def write_parquet(df, path: Path | str) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_parquet(path: Path | str, columns: list[str] | None = None):
    """Read a stage output; a missing or broken file is a UserError naming it."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (run the stage that produces it first: `dvc repro`)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in columns or [] if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}")
    return df


def read_table(path: Path | str, required: list[str]):
    """Read user data (txt/md: one document per file or per folder entry; jsonl/csv/parquet: rows).

    Errors name the file (and the row for malformed jsonl).
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data path not found")
    files = sorted(p for p in path.rglob("*") if p.suffix in TABLE_FORMATS) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path}: no {'/'.join(TABLE_FORMATS)} files in this folder")
    frames = []
    for f in files:
        if f.suffix not in TABLE_FORMATS:
            raise UserError(f"{f}: unsupported format (use one of {', '.join(TABLE_FORMATS)})")
        try:
            if f.suffix in (".txt", ".md"):
                df = pd.DataFrame({"text": [f.read_text(encoding="utf-8")], "source": [str(f)]})
            elif f.suffix == ".jsonl":
                rows = []
                for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{f}: row {i}: invalid JSON ({e.msg})") from None
                df = pd.DataFrame(rows)
            elif f.suffix == ".csv":
                df = pd.read_csv(f)
            else:
                df = pd.read_parquet(f)
        except UserError:
            raise
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if df.empty:
            raise UserError(f"{f}: no rows")
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise UserError(f"{f}: missing column(s) {missing} (has {list(df.columns)})")
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that produces it first: `dvc repro`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None
