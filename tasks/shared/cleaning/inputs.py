"""Reading a raw parquet file to clean: the columns each kind needs, row ids."""

from __future__ import annotations

from pathlib import Path

from tasks.shared.errors import UserError

REQUIRED = {"corpus": ["text"], "labeled": ["text", "label", "split"]}
"""The columns a raw file of each kind must have."""


def check_input(src: Path, kind: str):
    """Open the raw parquet `src` of `kind`; a UserError naming it if it is missing, unreadable or lacks a column."""
    import pyarrow.parquet as pq

    src = Path(src)
    if not src.exists():
        raise UserError(f"{src}: not found (run the stage that produces it first: `dvc repro`)")
    try:
        pf = pq.ParquetFile(src, buffer_size=1 << 20)  # buffered: a huge row group is read page by page
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise UserError(f"{src}: unreadable parquet file ({type(e).__name__}: {e})") from None
    missing = [c for c in REQUIRED[kind] if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{src}: missing column(s) {missing} (has {pf.schema_arrow.names})")
    return pf


def row_ids(table, start: int) -> list[str]:
    """The `id` column as strings, or row numbers (from `start`) for a file written without one."""
    import pyarrow as pa

    if "id" in table.column_names:
        return table.column("id").cast(pa.string()).to_pylist()
    return [str(i) for i in range(start, start + table.num_rows)]
