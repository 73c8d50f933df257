"""kg_evaluate: the extractor and its baselines on the held-out test docs.

Every system is scored on the same test docs (tasks/kg/predict.py) and reduced to per-document counts; the
intervals and the model-vs-baseline tests are a paired bootstrap over documents (tasks/kg/scoring.py). Writes
metrics/kg_evaluate.json (with the stage's cost), metrics/extract.json (KG-SPEC's keys), `paths.kg_evaluation/`
predictions.parquet (one row per test doc: each system's counts, which promotion compares with the champion's)
and report.md (per-type tables), and logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from models.extractor import load_extractor
from tasks.kg.baselines import Baselines
from tasks.kg.examples import load_task_data
from tasks.kg.predict import baseline_outputs, extractor_outputs
from tasks.kg.scoring import COUNTS, Scored, intervals, per_label, score_outputs, scores, versus
from tasks.shared.config.base import Paths
from tasks.shared.config.kg_evaluate import KgEvaluateConfig
from tasks.shared.cost import Meter
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir, write_json
from tasks.shared.stats import Resamples
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"kg_evaluate": KgEvaluateConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
EXTRACT_METRICS = "extract.json"
"""KG-SPEC's metrics file, in paths.metrics beside this stage's own."""
PREDICTIONS = "predictions.parquet"
REPORT = "report.md"
HEADLINE = ("entity_f1", "relation_f1", "linking_accuracy")
"""The metrics each model must beat its baseline on."""


def predictions_table(model: Scored, baseline: Scored) -> pd.DataFrame:
    """One row per test doc: `model_<count>` and `baseline_<count>` columns."""
    table = model.counts[["doc_id"]].copy()
    for system, scored in (("model", model), ("baseline", baseline)):
        for c in COUNTS:
            table[f"{system}_{c}"] = scored.counts[c].to_numpy()
    return table


def per_type(model: Scored, baseline: Scored) -> dict:
    """Per-label precision/recall/F1/support of entities and relations, for the model and the baselines."""
    return {
        "entities": {
            "model": per_label(model.gold_entities, model.pred_entities),
            "baseline": per_label(baseline.gold_entities, baseline.pred_entities),
        },
        "relations": {
            "model": per_label(model.gold_relations, model.pred_relations),
            "baseline": per_label(baseline.gold_relations, baseline.pred_relations),
        },
    }


def extract_metrics(model: Scored, baseline: Scored, resamples: Resamples) -> dict:
    """KG-SPEC's metrics/extract.json entries (without the counts of the test set and the model hash)."""
    m, b = scores(model.counts), scores(baseline.counts)
    mi, bi = intervals(model.counts, resamples), intervals(baseline.counts, resamples)
    vs = versus(model.counts, baseline.counts, resamples)
    out = {}
    unlinked = not model.counts["link_all_total"].sum()  # a user's spans: no knowledge base to link into
    for k in (*HEADLINE, "linking_accuracy_all"):
        out |= {k: m[k], f"{k}_ci95": mi[f"{k}_ci95"], f"{k}_baseline": b[k], f"{k}_baseline_ci95": bi[f"{k}_ci95"]}
        out[f"{k}_vs_baseline"] = vs[k]
        if unlinked and k.startswith("linking"):  # not measured: null, so that no gate reads a 0 as a score
            out |= dict.fromkeys((k, f"{k}_ci95", f"{k}_baseline", f"{k}_baseline_ci95", f"{k}_vs_baseline"))
    return out


def _table(rows: dict[str, dict], title: str) -> list[str]:
    lines = [f"| {title} | P | R | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |" for k, v in rows.items()
    ]
    return lines


def report(metrics: dict, types: dict) -> str:
    """The Markdown report: headline scores with intervals and p-values, then per-type tables."""
    lines = ["# Knowledge-graph extraction: held-out test docs", "", "| metric | model | baseline | diff | p |"]
    lines.append("|---|---|---|---|---:|")
    for k in (*HEADLINE, "linking_accuracy_all"):
        if metrics[k] is None:
            lines.append(f"| {k} | not measured (no mention to link) | | | |")
            continue
        (lo, hi), (blo, bhi), vs = metrics[f"{k}_ci95"], metrics[f"{k}_baseline_ci95"], metrics[f"{k}_vs_baseline"]
        lines.append(
            f"| {k} | {metrics[k]:.4f} [{lo:.4f}, {hi:.4f}] | {metrics[f'{k}_baseline']:.4f} [{blo:.4f}, {bhi:.4f}] "
            f"| {vs['diff']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}] | {vs['p_value']:.4g} |"
        )
    lines += ["", f"{metrics['test_docs']} docs, {metrics['test_mentions']} mentions, "]
    lines[-1] += f"{metrics['test_relations']} relation pairs, {metrics['test_links']} ambiguous links; p: one-sided "
    lines[-1] += "paired bootstrap over docs that the model is not better than the baseline."
    for task in ("entities", "relations"):
        for system in ("model", "baseline"):
            lines += ["", f"## {task}: {system}", "", *_table(types[task][system], "label")]
    return "\n".join(lines) + "\n"


def run(cfg: KgEvaluateConfig, paths: Paths, tracker: Tracker | None = None) -> dict:
    tracker = tracker or NullTracker()
    data = load_task_data(paths.kg_data)
    test = data.split("test")
    if not test:
        raise UserError(f"{paths.kg_data}: no test docs")
    ex = load_extractor(paths.kg_model)
    model = score_outputs(extractor_outputs(ex, test, cfg.batch_size), test, ex.entities)
    baseline = score_outputs(baseline_outputs(Baselines.load(paths.kg_model), test, ex.entities), test, ex.entities)
    resamples = Resamples(len(test), cfg.bootstrap_resamples, cfg.seed)
    types = per_type(model, baseline)
    metrics = extract_metrics(model, baseline, resamples) | {
        "per_type": types,
        "test_docs": len(test),
        "test_mentions": int(model.counts[["entity_tp", "entity_fn"]].to_numpy().sum()),
        "test_relations": int(model.counts[["relation_tp", "relation_fn"]].to_numpy().sum()),
        "test_links": int(model.counts["link_total"].sum()),
        "test_links_all": int(model.counts["link_all_total"].sum()),
        "model_sha256": tree_sha256(paths.kg_model),  # the whole bundle, as promotion checks it
        "model_version": ex.version,
    }
    with atomic_dir(paths.kg_evaluation) as d:
        predictions_table(model, baseline).to_parquet(d / PREDICTIONS, index=False)
        (d / REPORT).write_text(report(metrics, types))
    for name in (PREDICTIONS, REPORT):
        tracker.log_artifact(Path(paths.kg_evaluation) / name)
    tracker.log_dict(types, "per_type.json")
    return metrics


def main() -> None:
    def stage(p, t) -> dict:
        meter = Meter.start()  # extract.json carries the cost of the scoring itself (the harness adds the stage's)
        metrics = run(p.kg_evaluate, p.paths, t)
        write_json(Path(p.paths.metrics) / EXTRACT_METRICS, {**metrics, "cost": meter.stop().as_dict()})
        return metrics

    stage_main("kg_evaluate", stage, SECTIONS, RunOptions(inputs=("kg_data",), context="evaluation"))


if __name__ == "__main__":
    main()
