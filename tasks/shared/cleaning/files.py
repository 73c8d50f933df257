"""Clean one raw parquet file of either kind: the corpus streamed, the labeled set in memory."""

from __future__ import annotations

from pathlib import Path

from tasks.shared.cleaning.corpus import clean_corpus
from tasks.shared.cleaning.inputs import REQUIRED
from tasks.shared.cleaning.labeled import clean_labeled
from tasks.shared.cleaning.report import DatasetReport
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError
from tasks.shared.io import atomic_file


def clean_to(src: Path, tmp: Path, cfg: CleanConfig, kind: str, progress: bool = True) -> DatasetReport:
    """Clean `src` into `tmp` (no atomic rename: the caller owns it); a UserError if every row is filtered."""
    if kind not in REQUIRED:
        raise ValueError(f"kind must be 'corpus' or 'labeled', not {kind!r}")
    rep = clean_corpus(src, tmp, cfg, progress) if kind == "corpus" else clean_labeled(src, tmp, cfg)
    if not rep.output_rows:
        raise _all_filtered(rep)
    return rep


def clean_file(src: Path, dst: Path, cfg: CleanConfig, kind: str, progress: bool = True) -> dict:
    """Clean the raw parquet `src` ('corpus': streamed; 'labeled': in memory) into `dst`, written atomically.

    Returns the dataset's report (`DatasetReport.metrics()`: rows and bytes in and out, rows removed and
    changed per filter, PII by type). Raises a UserError naming the dataset and the filters if every row
    was removed (then `dst` is left as it was).
    """
    with atomic_file(dst) as tmp:
        return clean_to(Path(src), tmp, cfg, kind, progress).metrics()


def _all_filtered(rep: DatasetReport) -> UserError:
    why = ", ".join(f"{n} {k}" for k, n in rep.removed.items() if n) or "no rows in the input"
    return UserError(f"clean: every {rep.name} row was filtered out ({why}); check params.yaml clean:")
