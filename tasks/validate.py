"""validate: run the Great Expectations checkpoints of the gx/ project on the cleaned data.

gx/ (`paths.gx`) is a GX Core File Data Context kept in git: one expectation suite, validation
definition and checkpoint per table, named after it. The tables are the cleaned corpus, each labeled
split (train, val, test), and two tables derived from the labeled set: `splits` (one row per split and
source, and per split and text: a source or text in two splits is a duplicate there) and `classes` (one
row per split and label, with its row count and share). A checkpoint hands one dataframe to all of its
validation definitions, hence one checkpoint per table. Thresholds are `$PARAMETER`s filled from
params.yaml, so the contract lives in gx/ and the numbers live with the other parameters.

Each run works on a copy of gx/ inside the temporary folder of the Data Docs output, because GE writes
into its project as it runs (store ids, validation results, Data Docs): the tracked files stay untouched,
two clones (or two runs) never share a folder, and a killed run leaves only a temporary folder that the
next run removes. The checkpoints' UpdateDataDocsAction builds the Data Docs there; they replace
`paths.data_docs` in one rename. The result goes to `paths.validation` in the deterministic format of
tasks/shared/validation.py (what downstream stages depend on). Any failed expectation fails the stage
with one line naming each failure and up to three offending rows by `id`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.shared.config.base import Paths, StageParams, load_stage_params
from tasks.shared.config.clean import CleanConfig
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.config.validate import ValidateConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.tracking import Tracker
from tasks.shared.validation import describe_failure, open_checkpoints, record, write_result

SECTIONS = {"validate": ValidateConfig, "clean": CleanConfig, "ingest": IngestConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`); thresholds come from all three."""
SPLITS = ("train", "val", "test")
TABLES = ("corpus", *SPLITS, "splits", "classes")
"""One suite, validation definition and checkpoint per table in gx/, each named after the table."""
SITE = "local_site"
"""The Data Docs site of gx/great_expectations.yml that the checkpoints update."""


def tables(corpus: pd.DataFrame, labeled: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frame each checkpoint validates, by table name; vectorized (no per-row Python)."""
    lab = labeled.reindex(
        columns=["id", "text", "label", "source", "split"]
    )  # a missing column is the split suites' finding
    frames = {"corpus": corpus}
    for split in SPLITS:
        frames[split] = labeled[labeled["split"] == split].reset_index(drop=True)
    by_source = lab.drop_duplicates(["split", "source"])[["id", "split", "source"]]
    by_text = lab.drop_duplicates(["split", "text"])[["id", "split", "text"]]
    frames["splits"] = pd.concat([by_source, by_text], ignore_index=True)[["id", "split", "source", "text"]]
    classes = lab.groupby(["split", "label"]).size().reset_index(name="rows")
    classes["share"] = classes["rows"] / classes.groupby("split")["rows"].transform("sum")
    classes.insert(0, "id", classes["split"].astype(str) + "/" + classes["label"].astype(str))
    frames["classes"] = classes
    return frames


def expected_labels(cfg: ValidateConfig, packages: list[str], labeled: pd.DataFrame, stdlib: bool) -> list[str]:
    """The label set the data must have: `validate.labels`, else the configured packages (stdlib task)
    or the training labels."""
    if cfg.labels:
        return sorted(cfg.labels)
    if stdlib:
        return sorted(packages)
    return sorted(labeled.loc[labeled["split"] == "train", "label"].dropna().unique())


def suite_parameters(cfg: ValidateConfig, clean: CleanConfig, labels: list[str]) -> dict:
    """The values of the suites' `$PARAMETER`s."""
    return {
        "min_corpus_rows": cfg.min_corpus_rows,
        "min_rows_per_label": cfg.min_rows_per_label,
        "min_class_share": cfg.min_class_share,
        "min_unique_text_share": 1.0 - cfg.max_duplicate_ratio,
        "min_chars": clean.min_chars,
        "max_chars": clean.max_chars,
        "labeled_max_chars": clean.labeled_max_chars,
        "labels": labels,
    }


def checkpoint_inputs(
    cfg: ValidateConfig, clean: CleanConfig, packages: list[str], stdlib: bool, paths: Paths
) -> tuple[dict[str, pd.DataFrame], dict]:
    """What the checkpoints run on: the frame of each table, and the suite parameters.

    For a run by hand: `frames, params = checkpoint_inputs(*hand_run_args())`, then
    `ctx.checkpoints.get(name).run(batch_parameters={"dataframe": frames[name]}, expectation_parameters=params)`.
    """
    corpus = read_parquet(paths.clean_corpus, columns=["id"])  # GE names offending rows by id
    labeled = read_parquet(paths.clean_labeled, columns=["id", "split"])
    return tables(corpus, labeled), suite_parameters(cfg, clean, expected_labels(cfg, packages, labeled, stdlib))


def stage_args(p: StageParams) -> tuple:
    """The arguments of `run` and `checkpoint_inputs` (without the tracker), from the stage's params."""
    return p.validate, p.clean, p.ingest.packages, p.ingest.labeled == "stdlib", p.paths


def hand_run_args(params_file: str = "params.yaml") -> tuple:
    """`stage_args` as the stage reads them from `params_file`."""
    return stage_args(load_stage_params(params_file, SECTIONS))


@dataclass
class ValidateResult:
    success: bool
    evaluated: int
    failed: list[str] = field(default_factory=list)
    per_suite: dict[str, dict] = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return {
            "success": self.success,
            "evaluated": self.evaluated,
            "failed": len(self.failed),
            "suites": self.per_suite,
        }


def run(
    cfg: ValidateConfig,
    clean: CleanConfig,
    packages: list[str],
    stdlib: bool,
    paths: Paths,
    tracker: Tracker | None = None,
) -> ValidateResult:
    """Validate the cleaned data; writes the result and the Data Docs, raises UserError if any expectation fails."""
    from great_expectations.core.run_identifier import RunIdentifier

    frames, params = checkpoint_inputs(cfg, clean, packages, stdlib, paths)
    result = ValidateResult(success=True, evaluated=0)
    report: dict = {"suite_parameters": params, "suites": {}}
    with atomic_dir(paths.data_docs) as docs:
        work = docs / ".gx"
        checkpoints = open_checkpoints(Path(paths.gx), work, TABLES)
        run_id = RunIdentifier(run_name="lmforge-validate")  # one run: the Data Docs list its tables together
        for name in TABLES:
            checkpoint_result = checkpoints[name].run(
                batch_parameters={"dataframe": frames[name]}, expectation_parameters=params, run_id=run_id
            )
            for res in checkpoint_result.run_results.values():
                failed = [describe_failure(name, r) for r in res.results if not r.success]
                result.failed += failed
                result.evaluated += len(res.results)
                result.success &= bool(res.success)
                result.per_suite[name] = {
                    "success": bool(res.success),
                    "evaluated": len(res.results),
                    "failed": len(failed),
                }
                report["suites"][name] = {"success": bool(res.success), "results": [record(r) for r in res.results]}
        site = work / "uncommitted" / "data_docs" / SITE
        for item in site.iterdir():
            item.replace(docs / item.name)
        shutil.rmtree(work)
    write_result(
        paths.validation, {"success": result.success, "evaluated": result.evaluated, "failed": result.failed, **report}
    )
    if tracker:
        tracker.log_artifact(paths.validation, "validation")
        tracker.log_artifact(paths.data_docs, "validation/data_docs")
    if not result.success:
        index = Path(paths.data_docs) / "index.html"
        raise UserError(
            f"data validation failed ({len(result.failed)} of {result.evaluated} expectations; Data Docs: {index}): "
            + "; ".join(result.failed)
        )
    return result


def _main(p: StageParams, t: Tracker) -> dict:
    return run(*stage_args(p), t).metrics


def main() -> None:
    stage_main("validate", _main, SECTIONS)


if __name__ == "__main__":
    main()
