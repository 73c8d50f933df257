"""Small I/O helpers shared by the stages: atomic writes, tables, JSON metrics."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.errors import UserError

TABLE_FORMATS = (".txt", ".md", ".jsonl", ".csv", ".parquet")


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it replaces `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path | str, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(df, path: Path | str) -> None:
    with atomic_path(path) as tmp:
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
