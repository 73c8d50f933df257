"""clean: normalization, PII scrubbing, length and quality filters, exact and near-duplicate removal.

The work is done by tasks/shared/cleaning/ (the corpus is streamed, the labeled set held in memory).
Indentation is preserved (the corpus is mostly code). Each filter's removals and changes are counted in
`metrics/clean.json`, explained with examples in the Markdown report (`paths.clean_report`, also logged to
MLflow) and summed up in one stdout line per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.shared.cleaning.files import clean_to
from tasks.shared.cleaning.inputs import check_input
from tasks.shared.cleaning.report import markdown_report
from tasks.shared.config.base import Paths
from tasks.shared.config.clean import CleanConfig
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_file
from tasks.shared.text import normalize_text
from tasks.shared.tracking import Tracker

SECTIONS = {"clean": CleanConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""


def clean_text(text: str, cfg: CleanConfig) -> str:
    """Normalize one text: Unicode form, newlines, tabs, control/format characters, blank lines (the servers
    apply the same function to requests, with the values recorded in the registered model)."""
    return normalize_text(text, cfg.unicode_form, cfg.tab_size)


@dataclass
class CleanResult:
    corpus: dict
    labeled: dict
    report: str
    """The Markdown report."""

    @property
    def metrics(self) -> dict:
        return {"corpus": self.corpus, "labeled": self.labeled}


def run(cfg: CleanConfig, paths: Paths, tracker: Tracker | None = None) -> CleanResult:
    check_input(paths.raw_corpus, "corpus")
    check_input(paths.raw_labeled, "labeled")
    # Both outputs are replaced together or not at all; the labeled set (small) goes first so that a
    # labeled set filtered to nothing fails before the long corpus pass.
    with atomic_file(paths.clean_corpus) as corpus_tmp, atomic_file(paths.clean_labeled) as labeled_tmp:
        labeled = clean_to(paths.raw_labeled, labeled_tmp, cfg, "labeled")
        corpus = clean_to(paths.raw_corpus, corpus_tmp, cfg, "corpus")
    report = markdown_report([corpus, labeled])
    with atomic_file(paths.clean_report) as tmp:
        tmp.write_text(report)
    for rep in (corpus, labeled):
        print(rep.line(), flush=True)
    if tracker is not None:
        tracker.log_artifact(paths.clean_report, "clean")
    return CleanResult(corpus=corpus.metrics(), labeled=labeled.metrics(), report=report)


def main() -> None:
    stage_main("clean", lambda p, t: run(p.clean, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
