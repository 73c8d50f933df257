"""Workspace I/O shared by the stages: the one atomic writer (files and folders), tables, JSON.

Every stage output goes through `atomic_file` or `atomic_dir`: the content is written under a
temporary name beside the target and renamed into place only when complete, so an interrupted
stage never leaves an output that looks valid. Leftovers of a killed writer are removed the next
time anything writes that target.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from io import StringIO
from pathlib import Path
from typing import Iterable, Iterator

from tasks.shared.errors import UserError
from tasks.shared.lifeline import pid_alive

TABLE_FORMATS = (".txt", ".md", ".jsonl", ".csv", ".parquet")


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    """Temporary siblings of `target` left by a writer that no longer runs (killed, OOM)."""
    for p in target.parent.glob(f".{target.name}.*-*-*"):
        kind, pid = p.name[len(target.name) + 2 :].split("-")[:2]
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
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


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)
    return dict(pairs)


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "null"}


def _decode(f: Path) -> str:
    """The text of a user file; anything but UTF-8 (a BOM is fine) is a UserError naming line and byte."""
    data = f.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError(f"{f}: UTF-16 text; save the file as UTF-8")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise UserError(f"{f}: line {line}: not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}); save the file as UTF-8") from None


def _read_jsonl(f: Path) -> tuple[list[dict], list[int]]:
    """One JSON object per line; returns the objects and their line numbers."""
    rows, lines = [], []
    for i, line in enumerate(_decode(f).split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            raise UserError(f"{f}: row {i}: duplicate key {e.args[0]!r}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: row {i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{f}: row {i}: expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}")
        rows.append(obj)
        lines.append(i)
    return rows, lines


def _read_csv(f: Path) -> tuple[list[dict], list[int]]:
    """A CSV with a header; returns the rows (empty cells are None) and the line each one starts on."""
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) is less than one long document
    reader = csv.reader(StringIO(_decode(f), newline=""), strict=True)
    rows, lines, start = [], [], 1
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        dups = sorted({c for c in header if header.count(c) > 1})
        if dups:
            raise UserError(f"{f}: duplicate column names {dups}")
        start = reader.line_num + 1
        for record in reader:
            if record:  # a blank line
                if len(record) != len(header):
                    raise UserError(f"{f}: row {start}: {len(record)} fields, but the header has {len(header)}")
                rows.append({c: v if v != "" else None for c, v in zip(header, record)})
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{f}: row {start}: malformed CSV ({e})") from None
    return rows, lines


def _read_file(f: Path):
    """One user file as an object-typed frame and the row number of each row (0: the whole file)."""
    import pandas as pd

    if f.suffix in (".txt", ".md"):
        return pd.DataFrame({"text": [_decode(f)], "source": [str(f)]}, dtype=object), [0]
    if f.suffix == ".parquet":
        df = read_parquet(f).astype(object)
        return df, list(range(1, len(df) + 1))
    rows, lines = _read_jsonl(f) if f.suffix == ".jsonl" else _read_csv(f)
    return pd.DataFrame(rows, dtype=object), lines


def read_table(path: Path | str, required: list[str]):
    """Read user data (txt/md: one document per file or per folder entry; jsonl/csv/parquet: rows).

    Every cell keeps its Python value (object columns; empty CSV cells are None). The index is
    (file, row): the line a jsonl/csv row starts on (a CSV header is line 1), a parquet row's
    1-based position, 0 for a txt/md document. In a folder, hidden and `.dvc` files are skipped
    and any other format is an error. Errors are one line naming the file (and row or line).
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: data path not found")
    if path.is_dir():
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix != ".dvc"]
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(path).parts)]
        if not files:
            raise UserError(f"{path}: no {'/'.join(TABLE_FORMATS)} files in this folder")
    else:
        files = [path]
    frames = []
    for f in files:
        if f.suffix not in TABLE_FORMATS:
            raise UserError(f"{f}: unsupported format (use one of {', '.join(TABLE_FORMATS)})")
        try:
            df, rows = _read_file(f)
        except OSError as e:
            raise UserError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if df.empty:
            raise UserError(f"{f}: no rows")
        dups = sorted(set(df.columns[df.columns.duplicated()]))
        if dups:
            raise UserError(f"{f}: duplicate column names {dups}")
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise UserError(f"{f}: missing column(s) {missing} (has {list(df.columns)})")
        df.index = pd.MultiIndex.from_arrays([[str(f)] * len(df), rows], names=["file", "row"])
        frames.append(df)
    return pd.concat(frames)


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that produces it first: `dvc repro`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None
