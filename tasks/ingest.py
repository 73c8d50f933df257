"""ingest: build the raw pretraining corpus and the labeled fine-tuning set.

Default data comes from the installed Python standard library, so nothing is downloaded:
the corpus is module source plus module/class/function docstrings, and the labeled task is
"which top-level stdlib package does this function come from". Splits are assigned by whole
source file (per label, in a seeded hash order) so no file's text appears in two splits, and
files in the val/test splits are kept out of the pretraining corpus.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path

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


def assign_splits(groups: pd.DataFrame, cfg: IngestConfig) -> dict[str, str]:
    """Map each group (source file) to a split so each label gets ~val/test_fraction of its rows.

    `groups` has columns group, label, n. Groups are visited in seeded hash order: test fills
    first, then val, the rest (always at least the last group) is train.
    """
    out: dict[str, str] = {}
    for _, g in groups.groupby("label", sort=True):
        g = g.assign(h=[_seeded_hash(cfg.seed, str(k)) for k in g["group"]]).sort_values("h")
        total = g["n"].sum()
        quota = {"test": cfg.test_fraction * total, "val": cfg.val_fraction * total}
        filled = {"test": 0, "val": 0}
        for i, (key, n) in enumerate(zip(g["group"], g["n"])):
            last = i == len(g) - 1
            split = next((s for s in ("test", "val") if not last and filled[s] < quota[s]), "train")
            if split != "train":
                filled[split] += n
            out[key] = split
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


def stdlib_corpus(files: list[Path], root: Path, exclude: set[str], max_files: int, seed: int) -> tuple[pd.DataFrame, int]:
    rows, skipped = [], 0
    files = [f for f in files if str(f.relative_to(root)) not in exclude]
    if max_files:
        files = sorted(files, key=lambda f: _seeded_hash(seed, str(f.relative_to(root))))[:max_files]
    for f in files:
        src = _read_source(f)
        tree = _parse(src) if src else None
        if tree is None:
            skipped += 1
            continue
        rel = str(f.relative_to(root))
        rows.append({"text": src, "source": rel, "kind": "code"})
        rows += [{"text": d, "source": rel, "kind": "docstring"} for d in docstrings(tree)]
    return pd.DataFrame(rows, columns=["text", "source", "kind"]), skipped


def _user_labeled(cfg: IngestConfig, paths: Paths) -> pd.DataFrame:
    df = read_table(cfg.labeled, required=["text", "label"])
    df["text"], df["label"] = df["text"].astype(str), df["label"].astype(str)
    if "source" not in df.columns:
        df["source"] = [f"row-{i}" for i in range(len(df))]
    if "split" in df.columns:
        bad = sorted(set(df["split"]) - set(SPLITS))
        if bad:
            raise UserError(f"{cfg.labeled}: column split has values {bad}; allowed: {list(SPLITS)}")
        return df[["text", "label", "source", "split"]]
    return split_labeled(df[["text", "label", "source"]], cfg)


@dataclass
class IngestResult:
    corpus_rows: int
    labeled_rows: int
    rows_per_split: dict[str, int]
    labels: list[str]
    skipped_files: int

    @property
    def metrics(self) -> dict:
        return {
            "corpus_rows": self.corpus_rows,
            "labeled_rows": self.labeled_rows,
            "rows_per_split": self.rows_per_split,
            "n_labels": len(self.labels),
            "skipped_files": self.skipped_files,
        }


def run(cfg: IngestConfig, paths: Paths, tracker: Tracker | None = None) -> IngestResult:
    root = stdlib_root()
    files = stdlib_files(root) if "stdlib" in (cfg.corpus, cfg.labeled) else []

    labeled = split_labeled(stdlib_labeled(cfg, files, root), cfg) if cfg.labeled == "stdlib" else _user_labeled(cfg, paths)
    counts = labeled["label"].value_counts()
    small = counts[counts < cfg.min_examples_per_label]
    if len(small):
        raise UserError(
            f"params.yaml: ingest.min_examples_per_label: labels {dict(small)} have fewer than "
            f"{cfg.min_examples_per_label} examples"
        )

    held_out = set(labeled.loc[labeled["split"] != "train", "source"])
    skipped = 0
    if cfg.corpus == "stdlib":
        corpus, skipped = stdlib_corpus(files, root, held_out, cfg.max_files, cfg.seed)
    else:
        corpus = read_table(cfg.corpus, required=["text"])
        corpus["text"] = corpus["text"].astype(str)
        if "source" not in corpus.columns:
            corpus["source"] = [f"row-{i}" for i in range(len(corpus))]
        corpus["kind"] = corpus["kind"].astype(str) if "kind" in corpus.columns else "text"
        corpus = corpus[~corpus["source"].isin(held_out)][["text", "source", "kind"]]
    if corpus.empty:
        raise UserError(f"ingest.corpus ({cfg.corpus}): no documents")

    write_parquet(corpus, paths.raw_corpus)
    write_parquet(labeled, paths.raw_labeled)
    return IngestResult(
        corpus_rows=len(corpus),
        labeled_rows=len(labeled),
        rows_per_split={s: int((labeled["split"] == s).sum()) for s in SPLITS},
        labels=sorted(counts.index),
        skipped_files=skipped,
    )


def main() -> None:
    stage_main("ingest", lambda p, t: run(p.ingest, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
