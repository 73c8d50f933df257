"""validate: run the Great Expectations suites in data/expectations/ on the cleaned data.

Suites are GE 1.x JSON files with `$PARAMETER` placeholders filled from params.yaml, so the
contract lives in git and the thresholds live with the other parameters. The result goes to
`paths.validation` in the deterministic format of `tasks/shared/validation.py` (what downstream
stages depend on); the Data Docs go to `paths.data_docs` (they embed timestamps, so nothing depends
on them). Any failed expectation fails the stage, which stops everything downstream in `dvc repro`
and in the Prefect flow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tasks.shared.config.base import Paths, StageParams
from tasks.shared.config.clean import CleanConfig
from tasks.shared.config.ingest import IngestConfig
from tasks.shared.config.validate import ValidateConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet
from tasks.shared.tracking import Tracker
from tasks.shared.validation import write_result

SECTIONS = {"validate": ValidateConfig, "clean": CleanConfig, "ingest": IngestConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`); thresholds come from all three."""
SUITES = ("corpus", "labeled", "splits", "label_counts")
RESULT_KEYS = ("observed_value", "element_count", "missing_count", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
"""What a result record keeps of GE's result: values, no run ids or timestamps."""


def tables(corpus: pd.DataFrame, labeled: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The frames each suite checks; `splits` and `label_counts` are derived from `labeled`."""
    return {
        "corpus": corpus,
        "labeled": labeled,
        "splits": labeled[["source", "split"]].drop_duplicates().reset_index(drop=True),
        "label_counts": labeled.groupby(["label", "split"]).size().reset_index(name="n"),
    }


def expected_labels(params_labels: list[str], labeled: pd.DataFrame, stdlib: bool) -> list[str]:
    """The label set the data must have: the configured packages, or the training labels."""
    if stdlib:
        return sorted(params_labels)
    return sorted(labeled.loc[labeled["split"] == "train", "label"].unique())


def load_suite(path: Path):
    import great_expectations as gx

    try:
        d = json.loads(path.read_text())
        return gx.ExpectationSuite(**{k: d[k] for k in ("name", "expectations", "meta", "notes") if k in d})
    except FileNotFoundError:
        raise UserError(f"{path}: expectation suite not found") from None
    except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path}: invalid expectation suite ({e})") from None


def _describe_failure(r) -> str:
    kw = {k: v for k, v in r.expectation_config.kwargs.items() if k in ("column", "column_set", "value_set", "min_value", "max_value", "value")}
    res = r.result or {}
    detail = ""
    if res.get("unexpected_count"):
        sample = res.get("partial_unexpected_list", [])[:3]
        detail = f": {res['unexpected_count']} unexpected, e.g. {[str(s)[:40] for s in sample]}"
    elif "observed_value" in res:
        detail = f": observed {str(res['observed_value'])[:80]}"
    return f"{r.expectation_config.type}({kw}){detail}"


def _record(r) -> dict:
    """One expectation's outcome, deterministic for the same data (GE's own JSON carries fresh ids)."""
    cfg = r.expectation_config
    res = r.result or {}
    record = {
        "expectation": cfg.type,
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
        "success": bool(r.success),
        "result": {k: res[k] for k in RESULT_KEYS if k in res},
    }
    return json.loads(json.dumps(record, default=str))


@dataclass
class ValidateResult:
    success: bool
    evaluated: int
    failed: list[str] = field(default_factory=list)
    per_suite: dict[str, dict] = field(default_factory=dict)

    @property
    def metrics(self) -> dict:
        return {"success": self.success, "evaluated": self.evaluated, "failed": len(self.failed), "suites": self.per_suite}


def run(
    cfg: ValidateConfig,
    clean: CleanConfig,
    labels: list[str],
    stdlib: bool,
    paths: Paths,
    tracker: Tracker | None = None,
) -> ValidateResult:
    """Validate the cleaned data; writes results + Data Docs, raises UserError if any expectation fails."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    corpus = read_parquet(paths.clean_corpus)
    labeled = read_parquet(paths.clean_labeled)
    suite_params = {
        "min_corpus_rows": cfg.min_corpus_rows,
        "min_rows_per_label": cfg.min_rows_per_label,
        "min_chars": clean.min_chars,
        "max_chars": clean.max_chars,
        "labeled_max_chars": clean.labeled_max_chars,
        "labels": expected_labels(labels, labeled, stdlib),
    }
    suite_params["n_label_splits"] = 3 * len(suite_params["labels"])

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    result = ValidateResult(success=True, evaluated=0)
    report: dict = {"suite_parameters": suite_params, "suites": {}}
    with atomic_dir(paths.data_docs) as docs:
        ctx.add_data_docs_site(
            site_name="lmforge",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs.resolve())},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        source = ctx.data_sources.add_pandas("lmforge")
        for name, frame in tables(corpus, labeled).items():
            suite = ctx.suites.add(load_suite(Path(paths.expectations) / f"{name}.json"))
            batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
            vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
            res = vd.run(batch_parameters={"dataframe": frame}, expectation_parameters=suite_params)
            failed = [f"{name}: {_describe_failure(r)}" for r in res.results if not r.success]
            result.failed += failed
            result.evaluated += len(res.results)
            result.success &= bool(res.success)
            result.per_suite[name] = {"success": bool(res.success), "evaluated": len(res.results), "failed": len(failed)}
            report["suites"][name] = {"success": bool(res.success), "results": [_record(r) for r in res.results]}
        ctx.build_data_docs(site_names=["lmforge"])
    write_result(paths.validation, {"success": result.success, "evaluated": result.evaluated, "failed": result.failed, **report})
    if tracker:
        tracker.log_artifact(paths.validation, "validation")
        tracker.log_artifact(paths.data_docs, "validation/data_docs")
    if not result.success:
        raise UserError(f"data validation failed ({len(result.failed)} of {result.evaluated} expectations): " + "; ".join(result.failed))
    return result


def _main(p: StageParams, t: Tracker) -> dict:
    return run(p.validate, p.clean, p.ingest.packages, p.ingest.labeled == "stdlib", p.paths, t).metrics


def main() -> None:
    stage_main("validate", _main, SECTIONS)


if __name__ == "__main__":
    main()
