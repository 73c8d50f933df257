"""Workspace I/O shared by the stages: the one atomic writer (files and folders), tables, JSON.

Every stage output goes through `atomic_file` or `atomic_dir`: the content is written under a
temporary name beside the target and renamed into place only when complete, so an interrupted
stage never leaves an output that looks valid. Leftovers of a killed writer are removed the next
time anything writes that target.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import shutil
import tempfile
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    import pandas as pd

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


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Hard-link `src` at `dst` (a copy where links cannot be made: another file system, or links not allowed);
    `shutil.copytree(..., copy_function=link_or_copy)` lays out a folder without copying its bytes."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


class EmptyOutput(ValueError):
    """`write_parquet_chunks` got no rows and `empty_ok` is false (nothing was written)."""


def write_parquet_chunks(
    chunks: Iterable["pd.DataFrame"], path: Path | str, columns: list[str], empty_ok: bool = True
) -> int:
    """Frames of string `columns`, streamed into one parquet file (one row group per chunk) that replaces
    `path` only when every chunk was written; returns the row count. No rows: EmptyOutput unless `empty_ok`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in columns])
    rows = 0
    with atomic_file(path) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            for df in chunks:
                writer.write_table(pa.Table.from_pandas(df[columns], schema=schema, preserve_index=False))
                rows += len(df)
        if not rows and not empty_ok:
            raise EmptyOutput(str(path))
    return rows


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


_JSON_TYPES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
"""A byte-order mark decides the encoding (UTF-32 first: its little-endian mark starts with UTF-16's)."""
MB = 1 << 20


@dataclass(frozen=True)
class ReadOptions:
    """How user files are read: their encoding (a BOM overrides it), the largest record, the chunk size."""

    encoding: str = "utf-8"
    max_record_bytes: int = 16 * MB
    chunk_rows: int = 8192
    chunk_bytes: int = 16 * MB
    text_column: str = "text"
    """The column a txt/md document's text goes to."""


class _Lines:
    """The decoded lines of a text file, read with bounded memory; `offset` is the byte offset of the current line.

    Lines keep their line ending (the CSV reader needs it). A line longer than `max_record_bytes`, a NUL byte
    (a binary file) or bytes that do not decode are one UserError naming the file and line.
    """

    def __init__(self, f: Path, fh, opts: ReadOptions, on_bytes: Callable[[int], None] | None = None) -> None:
        self.f, self.fh, self.opts, self.on_bytes = f, fh, opts, on_bytes
        head = fh.read(4)
        self.encoding = next((enc for bom, enc in _BOMS if head.startswith(bom)), opts.encoding)
        fh.seek(0)
        self.wide = self.encoding in ("utf-16", "utf-32")
        if not self.wide:  # a NUL byte early on: a binary file (checked before decoding, which would fail first)
            sniff = fh.read(8192)
            if b"\0" in sniff:
                at = sniff.index(0)
                line = sniff.count(b"\n", 0, at) + 1
                raise UserError(f"{f}: line {line}: a NUL byte at offset {at}: a binary file, not text")
            fh.seek(0)
        if self.wide:  # a two- or four-byte encoding: newlines are not single bytes, so decode incrementally
            self.text = io.TextIOWrapper(fh, encoding=self.encoding, newline="")
        elif self.encoding == "utf-8-sig":
            fh.seek(len(codecs.BOM_UTF8))
            self.encoding = "utf-8"
        self.line = 0
        self.offset = fh.tell()

    def _too_long(self) -> UserError:
        limit = self.opts.max_record_bytes / MB
        return UserError(
            f"{self.f}: line {self.line}: longer than {limit:g} MB with no line break "
            f"(ingest.max_record_mb; split the record, or raise the limit if it is meant to be one record)"
        )

    def __iter__(self) -> Iterator[str]:
        limit = self.opts.max_record_bytes
        while True:
            self.line += 1
            if self.wide:
                try:
                    text = self.text.readline(limit + 1)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"{self.f}: not valid {self.encoding.upper()} ({e.reason}); check the file's encoding"
                    ) from None
                if not text:
                    return
                if len(text) > limit:
                    raise self._too_long()
                if self.on_bytes:
                    self.on_bytes(len(text) * 2)
                yield text
                continue
            start = self.offset
            raw = self.fh.readline(limit + 1)
            if not raw:
                return
            self.offset += len(raw)
            if len(raw) > limit:
                raise self._too_long()
            if b"\0" in raw:
                raise UserError(
                    f"{self.f}: line {self.line}: a NUL byte at offset {start + raw.index(0)}: a binary file, not text"
                )
            if self.on_bytes:
                self.on_bytes(len(raw))
            try:
                yield raw.decode(self.encoding)
            except UnicodeDecodeError as e:
                offset = start + e.start
                hint = "save the file as UTF-8" if self.encoding == "utf-8" else "check ingest.encoding"
                other = " or set ingest.encoding (e.g. latin-1)" if self.encoding == "utf-8" else ""
                raise UserError(
                    f"{self.f}: line {self.line}: "
                    f"not {self.encoding.upper() if self.encoding == 'utf-8' else self.encoding} "
                    f"(byte 0x{raw[e.start]:02x} at offset {offset}); {hint}{other}"
                ) from None


def _jsonl_rows(f: Path, fh, opts: ReadOptions, on_bytes) -> Iterator[tuple[int, dict]]:
    """One JSON object per line, with its line number (blank lines are skipped)."""
    lines = _Lines(f, fh, opts, on_bytes)
    for line in lines:  # not str.splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        i = lines.line
        try:
            obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
        except _DuplicateKey as e:
            raise UserError(f"{f}: row {i}: duplicate key {e.args[0]!r}") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: row {i}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{f}: row {i}: expected a JSON object, got {_JSON_TYPES.get(type(obj), type(obj).__name__)}"
            )
        yield i, obj


def _csv_rows(f: Path, fh, opts: ReadOptions, on_bytes) -> Iterator[tuple[int, dict]]:
    """A CSV with a header: each row (empty cells are None) with the line it starts on."""
    csv.field_size_limit(opts.max_record_bytes)
    lines = _Lines(f, fh, opts, on_bytes)
    reader = csv.reader(lines, strict=True)
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return
        dups = sorted({c for c in header if header.count(c) > 1})
        if dups:
            raise UserError(f"{f}: duplicate column names {dups}")
        start = reader.line_num + 1
        for record in reader:
            if record:  # a blank line
                if len(record) != len(header):
                    raise UserError(f"{f}: row {start}: {len(record)} fields, but the header has {len(header)}")
                yield start, {c: v if v != "" else None for c, v in zip(header, record)}
            start = reader.line_num + 1
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise UserError(
                f"{f}: row {start}: a field over {opts.max_record_bytes / MB:g} MB (ingest.max_record_mb)"
            ) from None
        raise UserError(f"{f}: row {start}: malformed CSV ({e})") from None


def _document(f: Path, fh, opts: ReadOptions, on_bytes) -> Iterator[tuple[int, dict]]:
    """A txt/md file is one document (row 0, its text in column opts.text_column); over max_record_bytes
    it is an error, read no further."""
    lines = _Lines(f, fh, opts, on_bytes)
    parts, size = [], 0
    for line in lines:
        size += len(line)
        if size > opts.max_record_bytes:
            raise UserError(
                f"{f}: a document of more than {opts.max_record_bytes / MB:g} MB (ingest.max_record_mb); "
                "split the file, or raise the limit"
            )
        parts.append(line)
    yield 0, {opts.text_column: "".join(parts), "source": str(f)}


def parquet_batches(pf, batch_size: int, columns: list[str] | None = None) -> Iterator:
    """The record batches of a pyarrow ParquetFile, read one row group at a time: a single `iter_batches`
    over a whole file keeps memory it has decoded (pyarrow 25: +7 MB a batch, 1 GB of RSS over a 1 GB corpus),
    while one reader per row group gives it back when the row group is done."""
    for group in range(pf.metadata.num_row_groups):
        yield from pf.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns)


def _parquet_chunks(
    f: Path, columns: list[str] | None, opts: ReadOptions, on_bytes
) -> Iterator[tuple[list[int], "pd.DataFrame", list[str]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        wanted = [c for c in names if columns is None or c in columns]
        dups = sorted({c for c in names if names.count(c) > 1})
        if dups:
            raise UserError(f"{f}: duplicate column names {dups}")
        first = 1
        for batch in parquet_batches(pf, opts.chunk_rows, wanted):
            if on_bytes:
                on_bytes(batch.nbytes)
            df = batch.to_pandas().astype(object)
            df = df.where(df.notna(), None)
            yield list(range(first, first + len(df))), df, names
            first += len(df)
        if first == 1:  # no rows: still report the columns it has
            import pandas as pd

            yield [], pd.DataFrame(columns=wanted, dtype=object), names
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{f}: unreadable parquet file ({type(e).__name__}: {e})") from None


def _chunks(
    f: Path, columns: list[str] | None, opts: ReadOptions, on_bytes
) -> Iterator[tuple[list[int], "pd.DataFrame", list[str]]]:
    """One user file as object-typed frames of at most opts.chunk_rows rows / chunk_bytes bytes, with their
    row numbers and the columns the file has so far (all of them, `columns` or not)."""
    import pandas as pd

    if f.suffix == ".parquet":
        yield from _parquet_chunks(f, columns, opts, on_bytes)
        return
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows}.get(f.suffix, _document)
    seen: dict[str, None] = {}
    rows, numbers, size = [], [], 0
    with f.open("rb") as fh:
        for i, row in reader(f, fh, opts, on_bytes):
            seen.update(dict.fromkeys(row))
            if columns is not None:
                row = {k: v for k, v in row.items() if k in columns}
            rows.append(row)
            numbers.append(i)
            size += sum(len(v) for v in row.values() if isinstance(v, str))
            if len(rows) >= opts.chunk_rows or size >= opts.chunk_bytes:
                yield numbers, pd.DataFrame(rows, dtype=object), list(seen)
                rows, numbers, size = [], [], 0
    if rows or not numbers:
        yield numbers, pd.DataFrame(rows, dtype=object), list(seen)


STDLIB = "stdlib"
"""The built-in data (ingest.corpus / ingest.labeled): built from the standard library, no user input."""


def user_inputs(*specs: str | list[str]) -> list[str]:
    """The user's input specs among `specs`, in order: each spec is `stdlib` (left out: no user input), a
    file, folder or glob, or a list of those (e.g. `user_inputs(cfg.corpus, cfg.labeled)`)."""
    return [item for spec in specs if spec != STDLIB for item in ([spec] if isinstance(spec, str) else spec)]


def expand_inputs(spec: str | Path | list, root: Path | None = None) -> list[Path]:
    """The files of an input spec: a file, a folder (read recursively), a glob (`data/user/*.jsonl`,
    `**` for any depth), or a list of those. In a folder or glob, hidden and `.dvc` files are skipped.
    A path that does not exist, a glob that matches no file, or a folder without files is a UserError."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    files: list[Path] = []
    for item in specs:
        item = str(item)
        if any(c in item for c in "*?["):
            base = Path(item).anchor or "."
            pattern = item[len(Path(item).anchor) :] if Path(item).is_absolute() else item
            matched = sorted(p for p in Path(base).glob(pattern) if p.is_file())
            matched = [
                p
                for p in matched
                if p.suffix != ".dvc" and not any(part.startswith(".") for part in p.parts if part not in (".", ".."))
            ]
            if not matched:
                raise UserError(f"{item}: no files match this pattern")
            files += matched
            continue
        path = Path(item)
        if not path.exists():
            raise UserError(f"{path}: data path not found")
        if path.is_dir():
            found = [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix != ".dvc"]
            found = [p for p in found if not any(part.startswith(".") for part in p.relative_to(path).parts)]
            if not found:
                raise UserError(f"{path}: no {'/'.join(TABLE_FORMATS)} files in this folder")
            files += found
        else:
            files.append(path)
    for f in files:
        if f.suffix not in TABLE_FORMATS:
            raise UserError(f"{f}: unsupported format (use one of {', '.join(TABLE_FORMATS)})")
    return list(dict.fromkeys(files))


def iter_table(
    spec: str | Path | list,
    required: list[str],
    columns: list[str] | None = None,
    opts: ReadOptions = ReadOptions(),
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator["pd.DataFrame"]:
    """User data as a stream of frames (txt/md: one document per file; jsonl/csv/parquet: rows), each at
    most `opts.chunk_rows` rows, so memory stays bounded whatever the size of the input.

    Every cell keeps its Python value (object columns; empty CSV cells are None); `columns` keeps only
    those. The index is (file, row): the line a jsonl/csv row starts on (a CSV header is line 1), a parquet
    row's 1-based position, 0 for a txt/md document. `on_bytes(n)` is called as input bytes are read
    (progress). Errors are one line naming the file (and row or line); a file without rows is one.
    """
    import pandas as pd

    for f in expand_inputs(spec):
        empty = True
        try:
            for numbers, df, has in _chunks(f, columns, opts, on_bytes):
                if not len(df):
                    continue
                missing = [c for c in required if c not in df.columns]
                if missing:
                    raise UserError(f"{f}: missing column(s) {missing} (has {has})")
                empty = False
                df.index = pd.MultiIndex.from_arrays([[str(f)] * len(df), numbers], names=["file", "row"])
                yield df
        except OSError as e:
            raise UserError(f"{f}: unreadable ({type(e).__name__}: {e})") from None
        if empty:
            raise UserError(f"{f}: no rows")


def read_table(
    spec: str | Path | list, required: list[str], columns: list[str] | None = None, opts: ReadOptions = ReadOptions()
):
    """All of `iter_table` as one frame (for inputs that must be seen whole, such as the labeled set)."""
    import pandas as pd

    return pd.concat(list(iter_table(spec, required, columns, opts)))


def read_json(path: Path | str) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that produces it first: `dvc repro`)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable JSON ({e})") from None
