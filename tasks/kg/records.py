"""The knowledge-graph task's tables on disk, and the user's labeled spans read into them.

`paths.kg_data` is a folder of flat parquet tables (entities, docs, mentions, relations, facts; their
columns: TABLES below). The user's own data is JSONL (or csv/parquet with JSON-string
columns), one text per row:

    {"text": "...", "entities": [{"start": 0, "end": 5, "label": "ORG"}, ...],
     "relations": [{"head": 0, "tail": 1, "label": "works_for"}, ...]}      # head/tail index `entities`

or Doccano's exports: `"label": [[start, end, label], ...]` (spans only), or `"entities": [{"id",
"start_offset", "end_offset", "label"}]` with `"relations": [{"from_id", "to_id", "type"}]`. `ingest`
reads and checks them (`read_user_spans`) into `paths.kg_raw`; a bad row is one line naming its file
and row.
"""

from __future__ import annotations

import json
import numbers
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tasks.shared.errors import UserError
from tasks.shared.io import ReadOptions, atomic_dir, atomic_file, read_parquet, read_table

ENTITY_COLUMNS = ["id", "name", "kind", "module", "source", "signature", "doc"]
DOC_COLUMNS = ["id", "text", "source", "module", "owner", "split"]
MENTION_COLUMNS = ["doc_id", "m", "start", "end", "label", "link"]
RELATION_COLUMNS = ["doc_id", "head", "tail", "label"]
FACT_COLUMNS = ["head", "relation", "tail"]
TABLES = {
    "entities": ENTITY_COLUMNS,
    "docs": DOC_COLUMNS,
    "mentions": MENTION_COLUMNS,
    "relations": RELATION_COLUMNS,
    "facts": FACT_COLUMNS,
}
"""The tables of `paths.kg_data` (`<name>.parquet`) and their columns; `m`, `start`, `end`, `head`,
`tail` are int64 (INT_COLUMNS), everything else a string."""
INT_COLUMNS = {"mentions": {"m", "start", "end"}, "relations": {"head", "tail"}}
"""The int64 columns of each table (the rest are strings)."""
ENTITY_LABELS = ("module", "class", "function", "exception", "parameter")
"""Mention labels of the default (stdlib) task."""
RELATIONS = ("raises", "returns", "calls", "inherits")
"""Fact relations; relation candidates add `none`."""
NONE = "none"
OWNER = -1
"""The relation head that stands for the documented definition (the doc's owner)."""
RAW_COLUMNS = ["id", "text", "source", "entities", "relations"]
"""`paths.kg_raw`: the user's rows after ingest (entities/relations as JSON strings)."""


@dataclass
class KgTables:
    """The task data: one frame per table of TABLES."""

    entities: pd.DataFrame
    docs: pd.DataFrame
    mentions: pd.DataFrame
    relations: pd.DataFrame
    facts: pd.DataFrame

    def frames(self) -> dict[str, pd.DataFrame]:
        return {name: getattr(self, name) for name in TABLES}


def frame(rows: list, table: str) -> pd.DataFrame:
    """Rows (dicts or tuples) as a frame of `table`: exactly its columns, ints int64, the rest strings."""
    ints = INT_COLUMNS.get(table, set())
    df = pd.DataFrame(rows, columns=TABLES[table])
    return df.astype({c: "int64" if c in ints else object for c in df.columns})


def _write(df: pd.DataFrame, columns: list[str], path: Path, ints: set[str] = frozenset()) -> None:
    """`df[columns]` as parquet with a fixed schema (int64 for `ints`, strings otherwise), even when empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.int64() if c in ints else pa.string()) for c in columns])
    pq.write_table(pa.Table.from_pandas(df[columns], schema=schema, preserve_index=False), path)


def write_tables(tables: KgTables, folder: Path | str, extra: dict[str, dict] | None = None) -> None:
    """Write every table (and each `extra` {file name: JSON object}) into `folder` at once: a temp folder
    renamed into place."""
    with atomic_dir(folder) as tmp:
        for name, df in tables.frames().items():
            _write(df, TABLES[name], tmp / f"{name}.parquet", INT_COLUMNS.get(name, set()))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_tables(folder: Path | str) -> KgTables:
    """The task data in `folder`; a missing table is a UserError naming it."""
    return KgTables(
        **{name: read_parquet(Path(folder) / f"{name}.parquet", columns) for name, columns in TABLES.items()}
    )


def write_raw(df: pd.DataFrame, path: Path | str) -> None:
    """Write `paths.kg_raw` (RAW_COLUMNS, all strings) atomically."""
    with atomic_file(path) as tmp:
        _write(df, RAW_COLUMNS, tmp)


def _where(key) -> str:
    file, row = key
    return f"{file}: row {row}" if row else file


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _json_list(value, name: str, where: str) -> list:
    """A list cell (JSONL) or a JSON string of one (csv/parquet); None is an empty list."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {name} is not valid JSON ({e.msg})") from None
    if hasattr(value, "tolist"):  # a parquet list column
        value = value.tolist()
    if not isinstance(value, list):
        raise UserError(f"{where}: {name} is {type(value).__name__}, not a list")
    return value


def _span(item, i: int, where: str) -> tuple[int, int, str, object]:
    """(start, end, label, doccano id) of entity `i`: {"start", "end", "label"}, Doccano's
    {"id", "start_offset", "end_offset", "label"}, or [start, end, label]."""
    if isinstance(item, list) and len(item) == 3:
        item = {"start": item[0], "end": item[1], "label": item[2]}
    if not isinstance(item, dict):
        raise UserError(f"{where}: entities[{i}] is {type(item).__name__}, not an object with start, end, label")
    start, end = item.get("start", item.get("start_offset")), item.get("end", item.get("end_offset"))
    missing = [k for k, v in (("start", start), ("end", end), ("label", item.get("label"))) if v is None]
    if missing:
        raise UserError(f"{where}: entities[{i}] has no {' or '.join(missing)}")
    if not _is_int(start) or not _is_int(end):
        raise UserError(f"{where}: entities[{i}]: start and end must be integers (got {start!r}, {end!r})")
    label = item["label"]
    if not isinstance(label, str) or not label.strip():
        raise UserError(f"{where}: entities[{i}]: label must be a non-empty string (got {label!r})")
    return int(start), int(end), label.strip(), item.get("id", i)


def check_spans(text: str, items: list, where: str) -> tuple[list[dict], dict]:
    """The entities sorted by start, and a map from each one's original index/id to its sorted index;
    out-of-range, empty and overlapping spans are a UserError naming the row."""
    spans = [_span(item, i, where) for i, item in enumerate(items)]
    order = sorted(range(len(spans)), key=lambda i: spans[i][:2])
    for i, (start, end, _, _) in enumerate(spans):
        if not 0 <= start < end <= len(text):
            what = "empty" if start >= end else "out of range"
            raise UserError(f"{where}: entities[{i}] [{start}, {end}) is {what} (the text has {len(text)} characters)")
    for a, b in zip(order, order[1:]):
        if spans[b][0] < spans[a][1]:
            raise UserError(
                f"{where}: entities[{a}] [{spans[a][0]}, {spans[a][1]}) and entities[{b}] "
                f"[{spans[b][0]}, {spans[b][1]}) overlap"
            )
    index = {}
    for new, old in enumerate(order):
        index[old] = new
        index[("id", spans[old][3])] = new
    entities = [{"start": spans[i][0], "end": spans[i][1], "label": spans[i][2]} for i in order]
    return entities, index


def check_relations(items: list, index: dict, doccano: bool, where: str) -> list[dict]:
    """The relations with head/tail as sorted entity indexes; a missing end or bad label names the row."""
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{where}: relations[{i}] is {type(item).__name__}, not an object with head, tail, label")
        keys = ("from_id", "to_id", "type") if doccano else ("head", "tail", "label")
        missing = [k for k in keys if item.get(k) is None]
        if missing:
            raise UserError(f"{where}: relations[{i}] has no {' or '.join(missing)}")
        head, tail, label = (item[k] for k in keys)
        ends = [index.get(("id", e)) if doccano else index.get(e) if _is_int(e) else None for e in (head, tail)]
        for name, value, end in zip(keys, (head, tail), ends):
            if end is None:
                raise UserError(f"{where}: relations[{i}]: {name} {value!r} is not one of the row's entities")
        if not isinstance(label, str) or not label.strip():
            raise UserError(f"{where}: relations[{i}]: label must be a non-empty string (got {label!r})")
        out.append({"head": ends[0], "tail": ends[1], "label": label.strip()})
    return sorted(out, key=lambda r: (r["head"], r["tail"], r["label"]))


def _user_row(key, row: dict, text_column: str) -> dict:
    where = _where(key)
    text = row.get(text_column)
    if not isinstance(text, str) or not text.strip():
        what = "missing or blank" if text is None or isinstance(text, str) else f"{type(text).__name__}, not a string"
        raise UserError(f"{where}: {text_column} is {what} (every span row needs a text)")
    if row.get("entities") is None and row.get("label") is None:
        raise UserError(f"{where}: no entities (give `entities`: [{{start, end, label}}], or Doccano's `label`)")
    raw = _json_list(row.get("entities") if row.get("entities") is not None else row.get("label"), "entities", where)
    doccano = any(isinstance(e, dict) and "start_offset" in e for e in raw)
    entities, index = check_spans(text, raw, where)
    relations = check_relations(_json_list(row.get("relations"), "relations", where), index, doccano, where)
    return {"text": text, "entities": json.dumps(entities), "relations": json.dumps(relations)}


def read_user_spans(spec: str | list[str], opts: ReadOptions, id_column: str = "id") -> pd.DataFrame:
    """The user's labeled spans (files, folders, globs) as RAW_COLUMNS, checked row by row."""
    text = opts.text_column
    df = read_table(
        spec, required=[text], columns=[text, id_column, "source", "entities", "relations", "label"], opts=opts
    )
    rows = []
    for key, row in zip(df.index, df.to_dict("records")):
        row = {k: (None if v is None or (isinstance(v, float) and v != v) else v) for k, v in row.items()}
        out = _user_row(key, row, text)
        ident, source = row.get(id_column), row.get("source")
        out["id"] = str(ident) if ident is not None and str(ident).strip() else f"{key[0]}#{key[1]}"
        out["source"] = str(source) if source is not None and str(source).strip() else key[0]
        rows.append(out)
    raw = pd.DataFrame(rows, columns=RAW_COLUMNS)
    dup = raw["id"].duplicated()
    if dup.any():
        first = int(dup.to_numpy().argmax())
        raise UserError(f"{_where(df.index[first])}: id {raw['id'].iloc[first]!r} is not unique")
    return raw
