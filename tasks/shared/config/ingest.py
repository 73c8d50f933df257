"""`ingest:` — where the raw corpus and labeled set come from and how they are split.

Every input must lie inside `paths.user_data`, the ingest stage's DVC dependency, so that editing it makes
`dvc status` (and `lmforge retrain`) report ingest; `outside_input` finds one that does not, for the whole-file
check (`tasks.shared.config.params.load_params`), which every entry point runs before a stage starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from tasks.shared.config.base import Section

INPUT_KEYS = ("corpus", "labeled", "spans", "pairs", "documents")
"""The keys of `ingest:` that name your files, folders or globs."""
WILDCARDS = "*?["


class IngestConfig(Section):
    """Build the raw corpus and labeled set."""

    corpus: str | list[str] = "stdlib"
    """`stdlib` (built from the installed Python standard library), or your txt/md/jsonl/csv/parquet data:
    a file, a folder (read recursively), a glob (`data/user/*.jsonl`, `**` for any depth) or a list of them. Every
    input, here and below, lies inside `paths.user_data` (the stage's DVC dependency); one outside is refused."""
    labeled: str | list[str] = "stdlib"
    """`stdlib` (which package a function comes from), or jsonl/csv/parquet data with text and label columns
    (files, folders or globs, as for `corpus`)."""
    spans: str | list[str] = "stdlib"
    """`stdlib` (the knowledge-graph task's data is built from the clean corpus' code by kg_data), or your
    labeled spans: JSONL rows `{"text", "entities": [{"start", "end", "label"}], "relations": [{"head",
    "tail", "label"}]}` (or Doccano's export; csv/parquet with JSON-string columns), as files, folders or globs."""
    pairs: str | list[str] = "stdlib"
    """`stdlib` (the alignment task's pairs: every function of the stdlib files ingest reads, its docstring and
    its code without it, held out by the classification split), or your pairs: jsonl/csv/parquet rows with a
    text and a code column (`pair_columns`), an optional id (`id_column`), `source` (rows of one source share a
    split; default: the file, and a single file is split by row) and `group` (the `module` shown in results),
    as files, folders or globs."""
    pair_columns: dict[str, str] = Field(default_factory=lambda: {"text": "text_a", "code": "text_b"})
    """Which columns of your pairs hold the natural-language side (`text`) and the code side (`code`)."""
    documents: str | list[str] = Field(default_factory=list)
    """Your documents to index (searched with the trained encoder, never trained on): txt/md files or
    jsonl/csv/parquet rows with a `text_column`, as files, folders or globs; `[]` = none."""
    text_column: str = Field("text", min_length=1)
    """The column of your data that holds the text."""
    label_column: str = Field("label", min_length=1)
    """The column of your labeled data that holds the label."""
    id_column: str = Field("id", min_length=1)
    """The column with each row's id (optional: a row without one gets `<file>#<row>`); ids must be unique."""
    encoding: str = "utf-8"
    """Encoding of your text files (jsonl/csv/txt/md); a UTF-8, UTF-16 or UTF-32 byte-order mark overrides it."""
    max_record_mb: float = Field(16.0, gt=0, le=1024)
    """The largest record read (a jsonl line, a CSV row, a txt/md file); a bigger one is an error, found
    without reading more than this much of it."""
    packages: list[str] = Field(
        default_factory=lambda: [
            "asyncio",
            "email",
            "idlelib",
            "tkinter",
            "multiprocessing",
            "xml",
            "importlib",
            "unittest",
            "http",
            "urllib",
        ]
    )
    """Top-level stdlib packages that become the labels of the default task."""
    min_examples_per_label: int = Field(100, ge=1)
    """A label with fewer examples is an error."""
    max_files: int = Field(0, ge=0)
    """Use at most this many source files per package and for the corpus (0 = all); for tiny runs."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of each label's examples (whole files) in the validation split."""
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of each label's examples (whole files) in the test split."""
    seed: int = 1337
    """Seed of the file-to-split assignment."""

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown encoding {self.encoding!r}") from None
        for name in ("corpus", "labeled", "spans", "pairs"):
            value = getattr(self, name)
            if isinstance(value, list) and (not value or "stdlib" in value):
                raise ValueError(
                    f"{name}: a list names your files, folders or globs (at least one; `stdlib` alone, not in a list)"
                )
        self._check_pair_inputs()
        if len({self.text_column, self.label_column, self.id_column}) < 3:
            raise ValueError("text_column, label_column and id_column must be three different columns")
        if self.labeled == "stdlib" and len(set(self.packages)) < 2:
            raise ValueError("packages: the stdlib task needs at least 2 distinct packages")
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self

    def _check_pair_inputs(self) -> None:
        if self.documents == "stdlib" or (isinstance(self.documents, list) and "stdlib" in self.documents):
            raise ValueError("documents: name your files, folders or globs (the stdlib functions are indexed anyway)")
        columns = self.pair_columns
        if set(columns) != {"text", "code"} or not all(isinstance(v, str) and v.strip() for v in columns.values()):
            raise ValueError(f"pair_columns: give exactly `text` and `code`, each a column name (got {columns})")
        if len({columns["text"], columns["code"], self.id_column}) < 3:
            raise ValueError("pair_columns: the text, code and id columns must be three different columns")


def searched_path(spec: str) -> Path:
    """The path an input spec reads: a file or folder itself, or the folder a glob searches (up to its first
    wildcard: `data/user/*.jsonl` searches `data/user`, `**/*.md` the project root)."""
    parts = Path(spec).parts
    wild = next((i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS)), None)
    return Path(spec) if wild is None else Path(*parts[:wild]) if wild else Path(".")


def outside_input(cfg: IngestConfig, user_data: Path, root: Path) -> tuple[str, str] | None:
    """The first input (`key`, spec) that does not lie inside `user_data`, both taken relative to `root` and
    resolved (symlinks and `..` followed), a glob by the folder it searches; None when all do."""
    home = (root / user_data).resolve()
    for key in INPUT_KEYS:
        value = getattr(cfg, key)
        specs = [] if value == "stdlib" else [value] if isinstance(value, str) else value
        for spec in specs:
            where = (root / searched_path(spec)).resolve()
            if where != home and home not in where.parents:
                return key, spec
    return None
