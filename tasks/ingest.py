"""ingest: build the raw pretraining corpus and the labeled fine-tuning set.

Default data comes from the installed Python standard library, so nothing is downloaded:
the corpus is module source plus module/class/function docstrings, and the labeled task is
"which top-level stdlib package does this function come from". Splits are assigned by whole
source file (per label, in a seeded hash order) so no file's text appears in two splits, and
files in the val/test splits are kept out of the pretraining corpus.

The alignment task's raw pairs (`paths.raw_pairs`, tasks/align/pairs.py) come from the same read:
every function of every stdlib file ingest reads (each file is read and parsed once), with its file's
split in the labeled set, and `train` for the other files (they are in the pretraining corpus).

User data (data/user/README.md) is checked row by row: a bad row stops the stage with one line
naming its file and row; blank corpus rows and corpus rows that share a source with a val/test
labeled row are left out, counted in the metrics and reported on stdout. Your pairs (`ingest.pairs`)
are split by `source` (default: the file; a single source is split by row), like the labeled set;
your documents (`ingest.documents`) get the split `index`.

Every input lies inside `paths.user_data`, the stage's DVC dependency: the whole-file check that runs before the
stage (tasks/shared/config/params.py) refuses one outside it, so editing any input makes `dvc status` report ingest.
"""

from __future__ import annotations

import ast
import math
import numbers
import sysconfig
import textwrap
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.align.records import INDEX_SPLIT, definitions, function_pairs, pair_frame
from tasks.kg.records import RAW_COLUMNS, read_user_spans, write_raw
from tasks.shared.config.base import Paths
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.datasets import log_dataset
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import (
    MB,
    STDLIB,
    EmptyOutput,
    ReadOptions,
    expand_inputs,
    iter_table,
    read_table,
    user_inputs,
    write_parquet,
    write_parquet_chunks,
)
from tasks.shared.splits import SPLITS, assign_splits, seeded_hash
from tasks.shared.tracking import Tracker

SECTIONS = {"ingest": IngestConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""

CORPUS_COLUMNS = ["id", "text", "source", "kind"]
LABELED_COLUMNS = ["id", "text", "label", "source", "split"]
"""The columns of paths.raw_corpus / paths.raw_labeled (all strings; ids unique per file)."""
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "_bundled"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[Path]:
    """Every .py file of the standard library, minus tests and third-party packages."""
    files = []
    for f in sorted(root.rglob("*.py")):
        parts = f.relative_to(root).parts
        if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            continue
        files.append(f)
    return files


def _read_source(f: Path) -> str | None:
    try:
        with tokenize.open(f) as fh:  # honours PEP 263 encoding declarations
            return fh.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _parse(src: str) -> ast.Module | None:
    try:
        return ast.parse(src)
    except (SyntaxError, ValueError):
        return None


def docstrings(tree: ast.Module, defs: list | None = None) -> list[str]:
    """Module, class and function docstrings of a parsed file (in `ast.walk`'s order); `defs`: the tree's
    `definitions`, when the caller has them already."""
    defs = definitions(tree) if defs is None else defs
    docs = [ast.get_docstring(tree)] + [ast.get_docstring(node) for node, _ in defs]
    return [d for d in docs if d]


def functions(tree: ast.Module, src: str) -> list[str]:
    """Source of every top-level function and method (nested defs stay inside their parent)."""
    lines = src.splitlines()
    out = []
    parents: list[ast.AST] = [tree] + [n for n in tree.body if isinstance(n, ast.ClassDef)]
    for parent in parents:
        for node in parent.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                out.append(textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno])))
    return out


@dataclass
class ParsedFile:
    """What ingest takes from one stdlib file (read and parsed once, whichever output needs it)."""

    src: str
    functions: list[str]
    docstrings: list[str]
    pairs: list[dict]


class StdlibReader:
    """Reads and parses each stdlib file at most once, keeping what the outputs need (not the syntax trees)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.parsed: dict[str, ParsedFile | None] = {}
        """Every file read so far by its path relative to `root`; None: it did not parse."""

    def get(self, f: Path) -> ParsedFile | None:
        rel = str(f.relative_to(self.root))
        if rel not in self.parsed:
            src = _read_source(f)
            tree = _parse(src) if src else None
            defs = definitions(tree) if tree is not None else []
            self.parsed[rel] = (
                None
                if tree is None
                else ParsedFile(src, functions(tree, src), docstrings(tree, defs), function_pairs(tree, src, rel, defs))
            )
        return self.parsed[rel]


def stdlib_labeled(cfg: IngestConfig, files: list[Path], reader: StdlibReader) -> pd.DataFrame:
    root = reader.root
    rows = []
    for pkg in cfg.packages:
        pkg_files = [f for f in files if f.relative_to(root).parts[0] == pkg and len(f.relative_to(root).parts) > 1]
        if not pkg_files:
            raise UserError(f"params.yaml: ingest.packages: {pkg!r} is not a package of the standard library at {root}")
        pkg_files.sort(key=lambda f: seeded_hash(cfg.seed, str(f.relative_to(root))))
        if cfg.max_files:
            pkg_files = pkg_files[: cfg.max_files]
        for f in pkg_files:
            parsed = reader.get(f)
            if parsed is None:
                continue
            rel = str(f.relative_to(root))
            rows += [
                {"id": f"{rel}#{i}", "text": t, "label": pkg, "source": rel} for i, t in enumerate(parsed.functions)
            ]
    return pd.DataFrame(rows, columns=["id", "text", "label", "source"])


def split_labeled(df: pd.DataFrame, cfg: IngestConfig) -> pd.DataFrame:
    groups = df.groupby(["source", "label"], sort=True).size().reset_index(name="n").rename(columns={"source": "group"})
    # a file whose rows carry several labels goes with its most frequent label
    groups = groups.sort_values("n", ascending=False).drop_duplicates("group")
    mapping = assign_splits(groups, cfg)
    return df.assign(split=df["source"].map(mapping))


def stdlib_corpus(
    files: list[Path], reader: StdlibReader, exclude: set[str], max_files: int, seed: int
) -> tuple[pd.DataFrame, list[str]]:
    """Source and docstrings of each file not in `exclude`; returns them and the files that did not parse."""
    root = reader.root
    rows, skipped = [], []
    files = [f for f in files if str(f.relative_to(root)) not in exclude]
    if max_files:
        files = sorted(files, key=lambda f: seeded_hash(seed, str(f.relative_to(root))))[:max_files]
    for f in files:
        parsed = reader.get(f)
        rel = str(f.relative_to(root))
        if parsed is None:
            skipped.append(rel)
            continue
        rows.append({"id": rel, "text": parsed.src, "source": rel, "kind": "code"})
        rows += [
            {"id": f"{rel}#doc{i}", "text": d, "source": rel, "kind": "docstring"}
            for i, d in enumerate(parsed.docstrings)
        ]
    return pd.DataFrame(rows, columns=CORPUS_COLUMNS), skipped


def stdlib_pairs(reader: StdlibReader, split_of: dict[str, str]) -> pd.DataFrame:
    """Every function of every file `reader` read, with its file's split in `split_of` (`train` if absent)."""
    rows = [
        {**pair, "split": split_of.get(rel, "train")}
        for rel, parsed in sorted(reader.parsed.items())
        if parsed is not None
        for pair in parsed.pairs
    ]
    return pair_frame(rows)


def _where(key) -> str:
    """'file: row N' for a (file, row) index entry of `read_table`; just the file for a whole-file document."""
    file, row = key
    return f"{file}: row {row}" if row else file


def _examples(keys, n: int = 3) -> str:
    return ", ".join(_where(k) for k in list(keys)[:n])


def _reject(bad: pd.Series, problem: str) -> None:
    """A UserError naming the first row where `bad` holds (and how many more), if any."""
    keys = bad.index[bad.to_numpy(dtype=bool)]
    if len(keys):
        rest = keys[1:]
        more = f" (and {len(rest)} more: {_examples(rest)}{', ...' if len(rest) > 3 else ''})" if len(rest) else ""
        raise UserError(f"{_where(keys[0])}: {problem}{more}")


def _to_str(value, integers: bool) -> str | None:
    """A cell as a string, None if it is null or blank; TypeError for a type that is not allowed."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if integers and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if integers and isinstance(value, float) and value.is_integer():  # an integer column with nulls reads as floats
        return str(int(value))
    raise TypeError(type(value).__name__)


def _strings(df: pd.DataFrame, column: str, integers: bool = False) -> pd.Series:
    """`df[column]` as strings (None where null or blank); other types are a UserError naming the row.

    With `integers`, an integer becomes its decimal string (label 3 -> "3"); text must be a string.
    """
    if column not in df.columns:
        return pd.Series(None, index=df.index, dtype=object)
    out = []
    for key, value in df[column].items():
        try:
            out.append(_to_str(value, integers))
        except TypeError as e:
            allowed = "a string or an integer" if integers else "a string"
            raise UserError(f"{_where(key)}: {column} is {e} {value!r:.40}, not {allowed}") from None
    return pd.Series(out, index=df.index, dtype=object)


def _sources(df: pd.DataFrame, kind: str) -> pd.Series:
    """The `source` column; rows without one get an id of their own (`labeled:<file>#row-12`) that
    cannot equal a generated id of the other input, so only real shared sources link the two."""
    source = _strings(df, "source", integers=True)
    generated = [f"{kind}:{file}#row-{row}" for file, row in df.index]
    return source.where(source.notna(), pd.Series(generated, index=df.index, dtype=object))


def _ids(df: pd.DataFrame, column: str) -> pd.Series:
    """The id column (strings or integers); a row without one gets `<file>#<row>` (a txt/md document: `<file>`)."""
    ids = _strings(df, column, integers=True)
    generated = [f"{file}#{row}" if row else file for file, row in df.index]
    return ids.where(ids.notna(), pd.Series(generated, index=df.index, dtype=object))


def read_options(cfg: IngestConfig) -> ReadOptions:
    return ReadOptions(encoding=cfg.encoding, max_record_bytes=int(cfg.max_record_mb * MB), text_column=cfg.text_column)


def _user_labeled(cfg: IngestConfig) -> pd.DataFrame:
    """The user's labeled set (held whole: splitting needs every source); a row without text or label,
    or with a bad split, is an error naming it."""
    text, label = cfg.text_column, cfg.label_column
    df = read_table(
        cfg.labeled,
        required=[text, label],
        columns=[text, label, cfg.id_column, "source", "split"],
        opts=read_options(cfg),
    )
    out = pd.DataFrame(
        {"id": _ids(df, cfg.id_column), "text": _strings(df, text), "label": _strings(df, label, integers=True)}
    )
    _reject(out["text"].isna(), f"{text} is missing or blank (every labeled row needs one; fix or remove the row)")
    _reject(out["label"].isna(), f"{label} is missing or blank (every labeled row needs one; fix or remove the row)")
    out["source"] = _sources(df, "labeled")
    if "split" not in df.columns:
        return split_labeled(out, cfg)
    out["split"] = _strings(df, "split")
    _reject(out["split"].isna(), f"split is missing (give every row one of {list(SPLITS)}, or drop the column)")
    bad = ~out["split"].isin(SPLITS)
    if bad.any():
        _reject(bad, f"split is {out['split'][bad].iloc[0]!r}; allowed: {list(SPLITS)}")
    return out


def _user_rows(df: pd.DataFrame, cfg: IngestConfig, code_column: str, what: str) -> pd.DataFrame:
    """Your pair or document rows as PAIR_COLUMNS without `text`/`split`: `code` from `code_column` (missing or
    blank: an error naming the row), `qualname` = id, `module` = `group` or source, `line` = the row."""
    code = _strings(df, code_column)
    source = _strings(df, "source", integers=True)
    source = source.where(source.notna(), pd.Series(df.index.get_level_values("file"), index=df.index))
    ids = _ids(df, cfg.id_column)
    group = _strings(df, "group", integers=True)
    out = pd.DataFrame(
        {
            "id": ids,
            "code": code,
            "qualname": ids,
            "module": group.where(group.notna(), source),
            "source": source,
            "line": df.index.get_level_values("row").astype("int64"),
        },
        index=df.index,
    )
    _reject(code.isna(), f"{code_column} is missing or blank (every {what} needs it; fix or remove the row)")
    return out


def _user_pairs(cfg: IngestConfig) -> pd.DataFrame:
    """Your pairs, split by source with `assign_splits` (a single source: by row id), indexed by (file, row)."""
    text, code = cfg.pair_columns["text"], cfg.pair_columns["code"]
    columns = [text, code, cfg.id_column, "source", "group"]
    df = read_table(cfg.pairs, required=[text, code], columns=columns, opts=read_options(cfg))
    out = _user_rows(df, cfg, code, "pair")
    out["text"] = _strings(df, text)
    _reject(out["text"].isna(), f"{text} is missing or blank (every pair needs both sides; fix or remove the row)")
    key = out["source"] if out["source"].nunique() > 1 else out["id"]
    groups = key.value_counts().sort_index()
    table = pd.DataFrame({"group": groups.index, "label": "pairs", "n": groups.to_numpy()})
    out["split"] = key.map(assign_splits(table, cfg))
    return out


def _user_documents(cfg: IngestConfig) -> pd.DataFrame:
    """Your documents to index: code = the text column, no text, split `index`."""
    columns = [cfg.text_column, cfg.id_column, "source", "group"]
    df = read_table(cfg.documents, required=[cfg.text_column], columns=columns, opts=read_options(cfg))
    return _user_rows(df, cfg, cfg.text_column, "document").assign(text="", split=INDEX_SPLIT)


def user_pair_rows(cfg: IngestConfig) -> pd.DataFrame:
    """Your pairs (when `ingest.pairs` names them) and documents, checked row by row, ids unique (an error
    naming the row); no rows when you gave neither."""
    parts = [_user_pairs(cfg)] if cfg.pairs != STDLIB else []
    if user_inputs(cfg.documents):
        parts.append(_user_documents(cfg))
    if not parts:
        return pair_frame([])
    rows = pd.concat(parts)
    dup = rows["id"].duplicated().to_numpy()
    if dup.any():
        raise UserError(f"{_where(rows.index[dup.argmax()])}: id {rows['id'].iloc[dup.argmax()]!r} is not unique")
    return pair_frame(rows.reset_index(drop=True))


def raw_pairs(cfg: IngestConfig, reader: StdlibReader, labeled: pd.DataFrame, user_rows: pd.DataFrame) -> pd.DataFrame:
    """The alignment task's raw pairs: the stdlib functions (split as their labeled file; `train` for the rest)
    or your pairs, and your documents (`user_rows`)."""
    if cfg.pairs != STDLIB:
        return user_rows
    split_of = dict(zip(labeled["source"], labeled["split"])) if cfg.labeled == STDLIB else {}
    rows = stdlib_pairs(reader, split_of)
    if not len(user_rows):
        return rows
    rows = pd.concat([rows, user_rows], ignore_index=True)
    dup = rows["id"].duplicated().to_numpy()
    if dup.any():
        row = rows.iloc[dup.argmax()]
        raise UserError(f"{row['source']}: row {row['line']}: id {row['id']!r} is a stdlib function's id; rename it")
    return rows


@dataclass
class CorpusCounts:
    rows: int = 0
    blank: int = 0
    held_out: int = 0
    blank_examples: list = field(default_factory=list)
    held_out_examples: list = field(default_factory=list)


def _user_corpus_chunks(
    cfg: IngestConfig, held_out: set[str], counts: CorpusCounts, on_bytes
) -> Iterator[pd.DataFrame]:
    """The user's corpus, chunk by chunk, without rows whose text is missing or blank or whose source is
    held out (in the labeled val/test splits); both are counted in `counts`, with examples."""
    text = cfg.text_column
    columns = [text, cfg.id_column, "source", "kind"]
    for df in iter_table(cfg.corpus, required=[text], columns=columns, opts=read_options(cfg), on_bytes=on_bytes):
        chunk = pd.DataFrame(
            {
                "id": _ids(df, cfg.id_column),
                "text": _strings(df, text),
                "source": _sources(df, "corpus"),
                "kind": _strings(df, "kind", integers=True).fillna("text"),
            }
        )
        blank = chunk["text"].isna().to_numpy()
        counts.blank += int(blank.sum())
        counts.blank_examples += list(chunk.index[blank][: 3 - len(counts.blank_examples)])
        chunk = chunk[~blank]
        out = chunk["source"].isin(held_out).to_numpy()
        counts.held_out += int(out.sum())
        counts.held_out_examples += list(chunk.index[out][: 3 - len(counts.held_out_examples)])
        chunk = chunk[~out]
        counts.rows += len(chunk)
        if len(chunk):
            yield chunk.reset_index(drop=True)


def check_labels(labeled: pd.DataFrame, name: str, min_examples: int) -> None:
    """At least 2 labels, each with `min_examples` rows and rows in train; val and test not empty."""
    counts = labeled["label"].value_counts()
    if len(counts) < 2:
        has = f"a single label {counts.index[0]!r}" if len(counts) else "no rows"
        raise UserError(f"{name}: labeled set has {has}; a classifier needs at least 2")
    small = counts[counts < min_examples]
    if len(small):
        raise UserError(
            f"params.yaml: ingest.min_examples_per_label: labels {dict(small)} have fewer than {min_examples} examples"
        )
    untrained = sorted(set(counts.index) - set(labeled.loc[labeled["split"] == "train", "label"]))
    if untrained:
        raise UserError(f"{name}: labels {untrained} have no rows in the train split; a classifier cannot learn them")
    empty = [s for s in SPLITS[1:] if not (labeled["split"] == s).any()]
    if empty:
        splits = " and ".join(empty) + (" splits are" if len(empty) > 1 else " split is")
        raise UserError(
            f"{name}: the {splits} empty "
            "(rows are split by whole source: add rows or distinct sources, or give a split column)"
        )


def _report(n: int, what: str, examples: str) -> None:
    """One stdout line for rows that were left out."""
    if n:
        print(f"ingest: {what}: {n} (e.g. {examples})", flush=True)


@dataclass
class IngestResult:
    corpus_rows: int
    labeled_rows: int
    rows_per_split: dict[str, int]
    labels: list[str]
    skipped_files: int
    corpus_blank: int = 0
    corpus_held_out: int = 0
    span_rows: int = 0
    """Rows of the user's labeled spans (0 with `ingest.spans: stdlib`)."""
    pair_rows: dict[str, int] = field(default_factory=dict)
    """Rows of paths.raw_pairs per split (`index`: your documents)."""

    @property
    def metrics(self) -> dict:
        return {
            "corpus_rows": self.corpus_rows,
            "labeled_rows": self.labeled_rows,
            "rows_per_split": self.rows_per_split,
            "n_labels": len(self.labels),
            "skipped_files": self.skipped_files,
            "corpus_blank": self.corpus_blank,
            "corpus_held_out": self.corpus_held_out,
            "span_rows": self.span_rows,
            "pair_rows": self.pair_rows,
        }


def _progress(desc: str, specs: list) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A tqdm bar over the bytes of the user inputs (MB/s); returns (update, close)."""
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in expand_inputs(specs))
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)
    return bar.update, bar.close


def run(cfg: IngestConfig, paths: Paths, tracker: Tracker | None = None) -> IngestResult:
    reader = StdlibReader(stdlib_root())
    files = stdlib_files(reader.root) if STDLIB in (cfg.corpus, cfg.labeled) else []

    labeled = split_labeled(stdlib_labeled(cfg, files, reader), cfg) if cfg.labeled == STDLIB else _user_labeled(cfg)
    check_labels(labeled, _name(cfg.labeled), cfg.min_examples_per_label)

    spans = read_user_spans(cfg.spans, read_options(cfg), cfg.id_column) if cfg.spans != STDLIB else None
    user_rows = user_pair_rows(cfg)
    held_out = set(labeled.loc[labeled["split"] != "train", "source"])
    skipped, counts = [], CorpusCounts()
    if cfg.corpus == STDLIB:
        # the stdlib corpus leaves held-out files unread, so they are counted as files
        counts.held_out = sum(str(f.relative_to(reader.root)) in held_out for f in files)
        corpus, skipped = stdlib_corpus(files, reader, held_out, cfg.max_files, cfg.seed)
        counts.rows = len(corpus)
        what = "stdlib files left out of the corpus (their functions are in val/test)"
        _report(counts.held_out, what, ", ".join(sorted(held_out)[:3]))
        _report(len(skipped), "stdlib files skipped (not valid Python)", ", ".join(skipped[:3]))
        write_parquet(corpus, paths.raw_corpus)
    else:
        update, close = _progress("ingest corpus", user_inputs(cfg.corpus))
        try:
            write_parquet_chunks(
                _user_corpus_chunks(cfg, held_out, counts, update), paths.raw_corpus, CORPUS_COLUMNS, empty_ok=False
            )
        except EmptyOutput:
            raise UserError(
                f"ingest.corpus ({_name(cfg.corpus)}): no documents "
                "(every row's text is missing or blank, or its source is held out)"
            ) from None
        finally:
            close()
        _report(counts.blank, "corpus rows dropped (text missing or blank)", _examples(counts.blank_examples))
        what = "corpus rows left out of pretraining (their source is in the labeled val/test splits)"
        _report(counts.held_out, what, _examples(counts.held_out_examples))
    if not counts.rows:
        raise UserError(f"ingest.corpus ({_name(cfg.corpus)}): no documents")
    write_parquet(labeled[LABELED_COLUMNS], paths.raw_labeled)
    write_raw(spans if spans is not None else pd.DataFrame(columns=RAW_COLUMNS), paths.kg_raw)
    pairs = raw_pairs(cfg, reader, labeled, user_rows)
    write_parquet(pairs, paths.raw_pairs)
    if tracker:
        for name, spec, output in (
            ("corpus", cfg.corpus, paths.raw_corpus),
            ("labeled", cfg.labeled, paths.raw_labeled),
            ("pairs", cfg.pairs, paths.raw_pairs),
        ):
            log_dataset(tracker, name, spec, output, context="ingest")
    return IngestResult(
        corpus_rows=counts.rows,
        labeled_rows=len(labeled),
        rows_per_split={s: int((labeled["split"] == s).sum()) for s in SPLITS},
        labels=sorted(labeled["label"].unique()),
        skipped_files=len(skipped),
        corpus_blank=counts.blank,
        corpus_held_out=counts.held_out,
        span_rows=0 if spans is None else len(spans),
        pair_rows={k: int(v) for k, v in pairs["split"].value_counts().sort_index().items()},
    )


def _name(spec: str | list[str]) -> str:
    return ", ".join(spec) if isinstance(spec, list) else spec


def main() -> None:
    stage_main("ingest", lambda p, t: run(p.ingest, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
