"""`ingest:` — where the raw corpus and labeled set come from and how they are split."""

from __future__ import annotations

from pydantic import Field, model_validator

from tasks.shared.config.base import Section


class IngestConfig(Section):
    """Build the raw corpus and labeled set."""

    corpus: str = "stdlib"
    """`stdlib` (built from the installed Python standard library) or a txt/md/jsonl/csv/parquet path."""
    labeled: str = "stdlib"
    """`stdlib` (which package a function comes from) or a jsonl/csv/parquet path with text,label columns."""
    packages: list[str] = Field(
        default_factory=lambda: ["asyncio", "email", "idlelib", "tkinter", "multiprocessing", "xml", "importlib", "unittest", "http", "urllib"]
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
        if self.labeled == "stdlib" and len(set(self.packages)) < 2:
            raise ValueError("packages: the stdlib task needs at least 2 distinct packages")
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self
