"""ingest: build the raw pretraining corpus and the labeled fine-tuning set.

Default data comes from the installed Python standard library, so nothing is downloaded:
the corpus is module source plus module/class/function docstrings, and the labeled task is
"which top-level stdlib package does this function come from". Splits are assigned by whole
source file (per label, in a seeded hash order) so no file's text appears in two splits, and
files in the val/test splits are kept out of the pretraining corpus.

User data (data/user/README.md) is checked row by row: a bad row stops the stage with one line
naming its file and row; blank corpus rows and corpus rows that share a source with a val/test
labeled row are left out, counted in the metrics and reported on stdout.
"""

from __future__ import annotations

import ast
import hashlib
import math
import numbers
import sysconfig
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.shared.config.base import Paths
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import read_table, write_parquet
from tasks.shared.tracking import Tracker

SECTIONS = {"ingest": IngestConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""

SPLITS = ("train", "val", "test")
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


def _seeded_hash(seed: int, key: str) -> str:
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


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


def docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings of a parsed file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(doc)
    return out


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


OVERSHOOT = 1.5
"""A group goes to a held-out split only if that split stays within OVERSHOOT x its quota for the label."""


def assign_splits(groups: pd.DataFrame, cfg: IngestConfig) -> dict[str, str]:
    """Map each group (source file) to a split so each label gets ~val/test_fraction of its rows.

    `groups` has columns group, label, n. Groups are visited in seeded hash order: test fills first,
    then val, the rest is train (always at least the last group). A group that would take a split past
    OVERSHOOT x its quota stays in train, so one big file cannot become most of a label's test rows; a
    held-out split that no group fits gets the label's smallest train group (while train keeps one).
    """
    out: dict[str, str] = {}
    for _, g in groups.groupby("label", sort=True):
        g = g.assign(h=[_seeded_hash(cfg.seed, str(k)) for k in g["group"]]).sort_values("h")
        total = g["n"].sum()
        quota = {"test": cfg.test_fraction * total, "val": cfg.val_fraction * total}
        filled = {"test": 0, "val": 0}
        for i, (key, n) in enumerate(zip(g["group"], g["n"])):
            last = i == len(g) - 1
            fits = [s for s in ("test", "val") if not last and filled[s] < quota[s] and filled[s] + n <= OVERSHOOT * quota[s]]
            out[key] = fits[0] if fits else "train"
            if fits:
                filled[fits[0]] += n
        for split in ("test", "val"):
            train = g[g["group"].map(out) == "train"].sort_values(["n", "h"])
            if not filled[split] and quota[split] > 0 and len(train) > 1:
                out[train["group"].iloc[0]] = split
    return out


def stdlib_labeled(cfg: IngestConfig, files: list[Path], root: Path) -> pd.DataFrame:
    rows = []
    for pkg in cfg.packages:
        pkg_files = [f for f in files if f.relative_to(root).parts[0] == pkg and len(f.relative_to(root).parts) > 1]
        if not pkg_files:
            raise UserError(f"params.yaml: ingest.packages: {pkg!r} is not a package of the standard library at {root}")
        pkg_files.sort(key=lambda f: _seeded_hash(cfg.seed, str(f.relative_to(root))))
        if cfg.max_files:
            pkg_files = pkg_files[: cfg.max_files]
        for f in pkg_files:
            src = _read_source(f)
            tree = _parse(src) if src else None
            if tree is None:
                continue
            rel = str(f.relative_to(root))
            rows += [{"text": t, "label": pkg, "source": rel} for t in functions(tree, src)]
    return pd.DataFrame(rows, columns=["text", "label", "source"])


def split_labeled(df: pd.DataFrame, cfg: IngestConfig) -> pd.DataFrame:
    groups = df.groupby(["source", "label"], sort=True).size().reset_index(name="n").rename(columns={"source": "group"})
    # a file whose rows carry several labels goes with its most frequent label
    groups = groups.sort_values("n", ascending=False).drop_duplicates("group")
    mapping = assign_splits(groups, cfg)
    return df.assign(split=df["source"].map(mapping))


def stdlib_corpus(files: list[Path], root: Path, exclude: set[str], max_files: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Source and docstrings of each file not in `exclude`; returns them and the files that did not parse."""
    rows, skipped = [], []
    files = [f for f in files if str(f.relative_to(root)) not in exclude]
    if max_files:
        files = sorted(files, key=lambda f: _seeded_hash(seed, str(f.relative_to(root))))[:max_files]
    for f in files:
        src = _read_source(f)
        tree = _parse(src) if src else None
        rel = str(f.relative_to(root))
        if tree is None:
            skipped.append(rel)
            continue
        rows.append({"text": src, "source": rel, "kind": "code"})
        rows += [{"text": d, "source": rel, "kind": "docstring"} for d in docstrings(tree)]
    return pd.DataFrame(rows, columns=["text", "source", "kind"]), skipped


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


def _user_labeled(cfg: IngestConfig) -> pd.DataFrame:
    """The user's labeled set; a row without text or label, or with a bad split, is an error naming it."""
    df = read_table(cfg.labeled, required=["text", "label"])
    out = pd.DataFrame({"text": _strings(df, "text"), "label": _strings(df, "label", integers=True)})
    _reject(out["text"].isna(), "text is missing or blank (every labeled row needs one; fix or remove the row)")
    _reject(out["label"].isna(), "label is missing or blank (every labeled row needs one; fix or remove the row)")
    out["source"] = _sources(df, "labeled")
    if "split" not in df.columns:
        return split_labeled(out, cfg)
    out["split"] = _strings(df, "split")
    _reject(out["split"].isna(), f"split is missing (give every row one of {list(SPLITS)}, or drop the column)")
    bad = ~out["split"].isin(SPLITS)
    if bad.any():
        _reject(bad, f"split is {out['split'][bad].iloc[0]!r}; allowed: {list(SPLITS)}")
    return out


def _user_corpus(cfg: IngestConfig) -> tuple[pd.DataFrame, pd.Index]:
    """The user's corpus without rows whose text is missing or blank; returns it and where those were."""
    df = read_table(cfg.corpus, required=["text"])
    text = _strings(df, "text")
    kind = _strings(df, "kind", integers=True).fillna("text")
    corpus = pd.DataFrame({"text": text, "source": _sources(df, "corpus"), "kind": kind})
    blank = text.isna()
    return corpus[~blank], corpus.index[blank.to_numpy()]


def check_labels(labeled: pd.DataFrame, name: str, min_examples: int) -> None:
    """At least 2 labels, each with `min_examples` rows and rows in train; val and test not empty."""
    counts = labeled["label"].value_counts()
    if len(counts) < 2:
        has = f"a single label {counts.index[0]!r}" if len(counts) else "no rows"
        raise UserError(f"{name}: labeled set has {has}; a classifier needs at least 2")
    small = counts[counts < min_examples]
    if len(small):
        raise UserError(f"params.yaml: ingest.min_examples_per_label: labels {dict(small)} have fewer than {min_examples} examples")
    untrained = sorted(set(counts.index) - set(labeled.loc[labeled["split"] == "train", "label"]))
    if untrained:
        raise UserError(f"{name}: labels {untrained} have no rows in the train split; a classifier cannot learn them")
    empty = [s for s in SPLITS[1:] if not (labeled["split"] == s).any()]
    if empty:
        splits = " and ".join(empty) + (" splits are" if len(empty) > 1 else " split is")
        raise UserError(
            f"{name}: the {splits} empty (rows are split by whole source: add rows or distinct sources, or give a split column)"
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
        }


def run(cfg: IngestConfig, paths: Paths, tracker: Tracker | None = None) -> IngestResult:
    root = stdlib_root()
    files = stdlib_files(root) if "stdlib" in (cfg.corpus, cfg.labeled) else []

    labeled = split_labeled(stdlib_labeled(cfg, files, root), cfg) if cfg.labeled == "stdlib" else _user_labeled(cfg)
    check_labels(labeled, cfg.labeled, cfg.min_examples_per_label)

    held_out = set(labeled.loc[labeled["split"] != "train", "source"])
    skipped, blank = [], pd.Index([])
    if cfg.corpus == "stdlib":
        # the stdlib corpus leaves held-out files unread, so they are counted as files
        n_held_out = sum(str(f.relative_to(root)) in held_out for f in files)
        corpus, skipped = stdlib_corpus(files, root, held_out, cfg.max_files, cfg.seed)
        what = "stdlib files left out of the corpus (their functions are in val/test)"
        _report(n_held_out, what, ", ".join(sorted(held_out)[:3]))
        _report(len(skipped), "stdlib files skipped (not valid Python)", ", ".join(skipped[:3]))
    else:
        corpus, blank = _user_corpus(cfg)
        _report(len(blank), "corpus rows dropped (text missing or blank)", _examples(blank))
        is_held_out = corpus["source"].isin(held_out).to_numpy()
        n_held_out = int(is_held_out.sum())
        what = "corpus rows left out of pretraining (their source is in the labeled val/test splits)"
        _report(n_held_out, what, _examples(corpus.index[is_held_out]))
        corpus = corpus[~is_held_out]
    if corpus.empty:
        raise UserError(f"ingest.corpus ({cfg.corpus}): no documents")

    write_parquet(corpus, paths.raw_corpus)
    write_parquet(labeled[["text", "label", "source", "split"]], paths.raw_labeled)
    return IngestResult(
        corpus_rows=len(corpus),
        labeled_rows=len(labeled),
        rows_per_split={s: int((labeled["split"] == s).sum()) for s in SPLITS},
        labels=sorted(labeled["label"].unique()),
        skipped_files=len(skipped),
        corpus_blank=len(blank),
        corpus_held_out=n_held_out,
    )


def main() -> None:
    stage_main("ingest", lambda p, t: run(p.ingest, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
