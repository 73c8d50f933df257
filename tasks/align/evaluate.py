"""align_evaluate: the dual encoder against lexical retrieval on held-out files, and zero-shot labels.

Text -> code: each test pair's `query` (paths.align_data pairs.parquet) searches the test pool (items.parquet rows
with split test; the gold is the item with the pair's id) by
- `dense`: exact cosine of the text tower's query vector and the code tower's item vectors (numpy, no index);
- `bm25`: bm25s over `lexical_tokens` of the items' code; `tfidf`: TF-IDF cosine (scikit-learn) on the same tokens;
- `hybrid`: reciprocal-rank fusion of the dense and BM25 rankings' first `hybrid_depth` items (as served);
- `int8`: dense with `Encoder.quantized()`.
Code -> text (`code_to_text`): each test pair's code searches all test queries. Ranks count ties against the gold
(tasks/align/retrieval.py). Every score has a 95% paired bootstrap interval over queries (`<metric>_ci95`), and the
differences dense - BM25, hybrid - BM25 (MRR) and dense - int8 (`int8_mrr_drop`) are paired over the same queries.
`served_mode`: what the service answers /search with by default — the best of dense, BM25 and the hybrid by MRR on
the validation files (not the test files: the test scores stay an unbiased estimate of what is served).

Zero-shot: the clean labeled set's test rows (functions) by the nearest label description (tasks/align/labels.py,
text tower) to the function's code vector; the linear probe: logistic regression on frozen code vectors of the
labeled train rows. The index figures are copied from the align_index stage's `index.json`.

Writes metrics/align.json (the task's keys), metrics/align_evaluate.json (everything, with the stage's cost) and
`paths.align_evaluation/`: rankings.parquet (per system and query: the gold's rank and the first 10 ids) and report.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from models.dual_encoder import Encoder, load_encoder
from tasks.align.labels import description
from tasks.align.retrieval import (
    QueryPool,
    bm25_scores,
    dense_scores,
    fused_ranks,
    gold_ranks,
    load_pool,
    paired_difference,
    per_query,
    ranking,
    system_metrics,
    tfidf_scores,
)
from tasks.shared.config.align_evaluate import AlignEvaluateConfig
from tasks.shared.config.base import Paths
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir, read_parquet, write_json
from tasks.shared.scoring import scores
from tasks.shared.stats import Resamples, score_intervals
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"align_evaluate": AlignEvaluateConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
ALIGN_METRICS = "align.json"
"""The task's metrics file (tasks/shared/tasks.py), in paths.metrics beside this stage's own."""
RANKINGS = "rankings.parquet"
REPORT = "report.md"
INDEX_META = "index.json"
"""The align_index stage's meta file in paths.align_index."""
INDEX_FIGURES = ("index_recall_at_10", "index_build_s", "index_size_mb")
PREFIX = {"dense": "", "code_to_text": "code_to_text_", "bm25": "bm25_", "tfidf": "tfidf_", "hybrid": "hybrid_"}
PREFIX |= {"int8": "int8_"}
"""Each system's prefix of its metrics (the dense model's are unprefixed)."""
SERVED_MODES = ("hybrid", "dense", "bm25")
"""The search modes served_mode chooses from; a tie in validation MRR goes to the earlier."""
ALIGN_KEYS = (
    "recall_at_1, recall_at_10, mrr, code_to_text_recall_at_1, code_to_text_recall_at_10, code_to_text_mrr, "
    "bm25_recall_at_1, bm25_recall_at_10, bm25_mrr, tfidf_recall_at_10, tfidf_mrr, hybrid_recall_at_1, "
    "hybrid_recall_at_10, hybrid_mrr, zero_shot_accuracy, zero_shot_macro_f1, linear_probe_accuracy, "
    "linear_probe_macro_f1, int8_mrr, int8_recall_at_10, int8_mrr_drop, encoder_size_mb, int8_size_mb, "
    "index_recall_at_10, index_build_s, index_size_mb, served_mode, served_mode_reason, queries, pool, encoder_sha256, "
    "dense_minus_bm25_mrr, hybrid_minus_bm25_mrr, index_sha256"
).split(", ")
"""metrics/align.json's keys (each with its `<key>_ci95` interval where it has one); promotion reads the paired
differences with BM25, served_mode, index_recall_at_10 and the sha256 of the encoder and index folders scored."""


@dataclass(frozen=True)
class Ranked:
    """One system on every query: the gold's rank (inf: not retrieved) and the first 10 candidates' rows."""

    ranks: np.ndarray
    top: np.ndarray


def ranked(scores_: np.ndarray, gold: np.ndarray) -> Ranked:
    """The gold's ranks and the first 10 candidates of a score matrix (queries, candidates)."""
    return Ranked(gold_ranks(scores_, gold), ranking(scores_, gold, 10))


def searched(encoder: Encoder, pool: QueryPool, cfg: AlignEvaluateConfig) -> tuple[dict[str, Ranked], np.ndarray]:
    """The search modes the service offers (dense, bm25 and their hybrid) ranked on `pool`, and the text and code
    vectors (`text`, `code` rows of one array each, returned as a pair)."""
    queries, codes, gold = pool.queries["query"].tolist(), pool.items["code"].tolist(), pool.gold
    text = encoder.embed(queries, "text", cfg.batch_size)
    code = encoder.embed(codes, "code", cfg.batch_size)
    dense, bm25 = text @ code.T, bm25_scores(codes, queries, cfg.bm25_k1, cfg.bm25_b)
    depth = min(cfg.hybrid_depth, len(codes))
    hybrid = Ranked(*fused_ranks(ranking(dense, gold, depth), ranking(bm25, gold, depth), gold))
    return {"dense": ranked(dense, gold), "bm25": ranked(bm25, gold), "hybrid": hybrid}, (text, code)


def retrieve(encoder: Encoder, int8: Encoder, pool: QueryPool, cfg: AlignEvaluateConfig) -> dict[str, Ranked]:
    """Every system's ranks on the pool: dense, code_to_text, bm25, tfidf, hybrid and int8 (the `int8` encoder)."""
    systems, (text, code) = searched(encoder, pool, cfg)
    queries, codes, gold = pool.queries["query"].tolist(), pool.items["code"].tolist(), pool.gold
    own = np.arange(len(gold))  # code -> text: pair i's code (item gold[i]) finds query i among all queries
    systems |= {"code_to_text": ranked(code[gold] @ text.T, own), "tfidf": ranked(tfidf_scores(codes, queries), gold)}
    systems["int8"] = ranked(dense_scores(int8, pool, cfg.batch_size), gold)
    return systems


def served_choice(encoder: Encoder, val: QueryPool | None, cfg: AlignEvaluateConfig) -> dict:
    """The search mode the service answers with: the best validation MRR of dense, BM25 and their hybrid (a tie goes
    to the earlier of SERVED_MODES). Chosen on the validation files, so the test scores stay an unbiased estimate of
    what is served; without validation pairs, the hybrid."""
    if val is None:
        return {"served_mode": SERVED_MODES[0], "served_mode_reason": "no validation pairs: the hybrid by default"}
    systems, _ = searched(encoder, val, cfg)
    mrr = {m: round(float(per_query(systems[m].ranks)["mrr"].mean()), 4) for m in SERVED_MODES}
    mode = max(SERVED_MODES, key=lambda m: (mrr[m], -SERVED_MODES.index(m)))
    shown = ", ".join(f"{m} {v:.4f}" for m, v in mrr.items())
    return {
        "served_mode": mode,
        "served_mode_reason": f"best validation MRR ({shown}; {len(val.queries)} queries over {len(val.items)} items)",
        **{f"val_{m}_mrr": v for m, v in mrr.items()},
    }


def retrieval_metrics(systems: dict[str, Ranked], resamples: Resamples) -> dict:
    """Each system's recall@1/@10 and MRR with intervals, the paired differences and the served mode."""
    idx = resamples.indices()
    out = {}
    for name, system in systems.items():
        out |= system_metrics(system.ranks, idx, PREFIX[name])
    mrr = {name: per_query(s.ranks)["mrr"] for name, s in systems.items()}
    for key, (a, b) in {
        "dense_minus_bm25_mrr": ("dense", "bm25"),
        "hybrid_minus_bm25_mrr": ("hybrid", "bm25"),
        "dense_minus_hybrid_mrr": ("dense", "hybrid"),
        "int8_mrr_drop": ("dense", "int8"),
    }.items():
        out[key], out[f"{key}_ci95"] = paired_difference(mrr[a], mrr[b], idx)
    return out


def _classified(prefix: str, y_true: list[str], y_pred: list[str], labels: list[str], seed: int, count: int) -> dict:
    s = scores(y_true, y_pred, labels)
    ci = score_intervals(y_true, y_pred, labels, Resamples(len(y_true), count, seed))
    out = {f"{prefix}_accuracy": s["accuracy"], f"{prefix}_macro_f1": s["macro_f1"]}
    out |= {f"{prefix}_{k}": v for k, v in ci.items()}
    return out | {f"{prefix}_per_class_f1": s["per_class_f1"]}


def label_metrics(encoder: Encoder, labeled: pd.DataFrame, cfg: AlignEvaluateConfig) -> dict:
    """Zero-shot (nearest label description) and linear-probe accuracy and macro-F1 on the labeled test rows."""
    train, test = labeled[labeled["split"] == "train"], labeled[labeled["split"] == "test"]
    if 0 < cfg.probe_train_rows < len(train):
        train = train.sample(cfg.probe_train_rows, random_state=cfg.seed)
    labels = sorted(labeled["label"].unique())
    if test.empty or train["label"].nunique() < 2:  # nothing to classify: null, never a score of 0
        keys = [f"{p}_{m}" for p in ("zero_shot", "linear_probe") for m in ("accuracy", "macro_f1")]
        return dict.fromkeys([*keys, *(f"{k}_ci95" for k in keys)])
    test_vecs = encoder.embed(test["text"].tolist(), "code", cfg.batch_size)
    label_vecs = encoder.embed([description(lab) for lab in labels], "text", cfg.batch_size)
    zero_shot = [labels[i] for i in np.argmax(test_vecs @ label_vecs.T, axis=1)]
    probe = LogisticRegression(C=cfg.probe_c, max_iter=cfg.probe_max_iter)
    probe.fit(encoder.embed(train["text"].tolist(), "code", cfg.batch_size), train["label"].to_numpy())
    y, n = test["label"].tolist(), cfg.bootstrap_resamples
    out = _classified("zero_shot", y, zero_shot, labels, cfg.seed, n)
    return out | _classified("linear_probe", y, probe.predict(test_vecs).tolist(), labels, cfg.seed, n)


def index_figures(folder: Path, encoder_version: str) -> dict:
    """INDEX_FIGURES from the align_index stage's meta (its measurements are under `extra`; the size, when the meta
    lacks it, is the folder's as align_index measures it); the index must have been built by this encoder."""
    path = Path(folder) / INDEX_META
    if not path.is_file():
        raise UserError(f"{path}: not found (run the align_index stage first: `dvc repro align_index`)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not JSON ({e}); rerun align_index") from None
    built_by = meta.get("encoder_version", encoder_version)
    if built_by != encoder_version:
        raise UserError(f"{path}: built by encoder {built_by[:12]}, not {encoder_version[:12]}: rerun align_index")
    size_mb = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20
    figures = {"index_size_mb": round(size_mb, 2)} | meta | meta.get("extra", {})
    missing = [k for k in INDEX_FIGURES if k not in figures]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} (rerun align_index)")
    return {k: figures[k] for k in INDEX_FIGURES}


def rankings_table(systems: dict[str, Ranked], pool: QueryPool) -> pd.DataFrame:
    """One row per system and query: the query's id, the gold's rank (null: not retrieved) and the first 10 ids
    (item ids; for code_to_text the ids of the pairs whose queries were found)."""
    item_ids, pair_ids = pool.items["id"].to_numpy(), pool.queries["id"].to_numpy()
    frames = []
    for name, s in systems.items():
        ids = pair_ids if name == "code_to_text" else item_ids
        top = [[str(ids[i]) for i in row if i >= 0] for row in s.top]
        rank = pd.array([None if np.isinf(r) else int(r) for r in s.ranks], dtype="Int64")
        frames.append(pd.DataFrame({"system": name, "query_id": pair_ids, "gold_rank": rank, "top10": top}))
    return pd.concat(frames, ignore_index=True)


def evaluate(
    encoder: Encoder, pool: QueryPool, labeled: pd.DataFrame, cfg: AlignEvaluateConfig
) -> tuple[dict, pd.DataFrame]:
    """Every score of the encoder and the baselines (without the index figures) and the rankings table."""
    int8 = encoder.quantized()
    systems = retrieve(encoder, int8, pool, cfg)
    metrics = retrieval_metrics(systems, Resamples(len(pool.queries), cfg.bootstrap_resamples, cfg.seed))
    metrics |= label_metrics(encoder, labeled, cfg)
    metrics |= {
        "encoder_size_mb": round(encoder.size_mb(), 3),
        "int8_size_mb": round(int8.size_mb(), 3),
        "queries": len(pool.queries),
        "pool": len(pool.items),
        "encoder_version": encoder.version,
    }
    return metrics, rankings_table(systems, pool)


def _cell(metrics: dict, key: str) -> str:
    if metrics.get(key) is None:
        return "n/a"
    ci = metrics.get(f"{key}_ci95")
    return f"{metrics[key]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{metrics[key]}"


def report(metrics: dict) -> str:
    """The Markdown report: retrieval per system, the paired differences, zero-shot and probe, int8, the index."""
    lines = ["# Text/code alignment: held-out test files", "", "| system | recall@1 | recall@10 | MRR |"]
    lines.append("|---|---|---|---|")
    for name, p in PREFIX.items():
        cells = [_cell(metrics, f"{p}{m}") for m in ("recall_at_1", "recall_at_10", "mrr")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| paired difference (MRR) | value [95% CI] |", "|---|---|"]
    for key in ("dense_minus_bm25_mrr", "hybrid_minus_bm25_mrr", "dense_minus_hybrid_mrr", "int8_mrr_drop"):
        lines.append(f"| {key} | {_cell(metrics, key)} |")
    lines += ["", "| labels (clean labeled test rows) | accuracy | macro-F1 |", "|---|---|---|"]
    for p in ("zero_shot", "linear_probe"):
        lines.append(f"| {p} | {_cell(metrics, f'{p}_accuracy')} | {_cell(metrics, f'{p}_macro_f1')} |")
    lines += ["", "| figure | value |", "|---|---|"]
    for key in ("served_mode", "encoder_size_mb", "int8_size_mb", *INDEX_FIGURES, "encoder_sha256", "index_sha256"):
        lines.append(f"| {key} | {metrics.get(key)} |")
    lines += ["", f"{metrics['queries']} queries over a pool of {metrics['pool']} test items; ranks count ties "]
    lines[-1] += "against the gold; intervals: paired bootstrap over queries (rows for the labels)."
    return "\n".join(lines) + "\n"


def align_metrics(metrics: dict) -> dict:
    """The entries of metrics/align.json: ALIGN_KEYS and their intervals."""
    return {k: v for k, v in metrics.items() if k in ALIGN_KEYS or k.removesuffix("_ci95") in ALIGN_KEYS}


def validation_pool(folder: Path) -> QueryPool | None:
    """The validation pairs and items, or None when there are none (your data may have no validation split)."""
    try:
        return load_pool(folder, "val")
    except UserError:
        return None


def run(cfg: AlignEvaluateConfig, paths: Paths, tracker: Tracker | None = None) -> dict:
    tracker = tracker or NullTracker()
    encoder = load_encoder(paths.align_model)
    figures = index_figures(paths.align_index, encoder.version)
    metrics, table = evaluate(encoder, load_pool(paths.align_data), read_parquet(paths.clean_labeled), cfg)
    metrics |= served_choice(encoder, validation_pool(Path(paths.align_data)), cfg)
    metrics |= figures | {
        "encoder_sha256": tree_sha256(paths.align_model),  # the whole bundle and index, as promotion checks them
        "index_sha256": tree_sha256(paths.align_index),
    }
    with atomic_dir(paths.align_evaluation) as d:
        table.to_parquet(d / RANKINGS, index=False)
        (d / REPORT).write_text(report(metrics))
    for name in (RANKINGS, REPORT):
        tracker.log_artifact(Path(paths.align_evaluation) / name)
    return metrics


def main() -> None:
    def stage(p, t) -> dict:
        metrics = run(p.align_evaluate, p.paths, t)
        write_json(Path(p.paths.metrics) / ALIGN_METRICS, align_metrics(metrics))
        return metrics

    stage_main(
        "align_evaluate", stage, SECTIONS, RunOptions(inputs=("align_data", "clean_labeled"), context="evaluation")
    )


if __name__ == "__main__":
    main()
