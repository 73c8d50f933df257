"""promote for task `align`: gate the evaluated dual encoder, register it with its index, move `champion` if it passes.

The same contract as the other tasks' promotion (tasks/ops/promote.py, whose registration, tags, lineage and alias
moves it reuses): DVC must report the task's stages (and the shared ones) up to date, and the encoder and index being
registered must be what align_evaluate scored (sha256). Gates: the data validation of the shared corpus,
beats_bm25 (the served search mode's test MRR against BM25's on the same held-out queries: the paired bootstrap
interval of the difference), index_recall (the approximate index's recall@10 against exact search), no_regression
(the champion encoder, loaded from the registry, searched again with the candidate's test queries over the candidate's
pool) and a smoke test that loads the candidate with the serving core and searches. The registered version holds
`artifacts/encoder/` (the bundle) and `artifacts/index/` (the index built with it); its tag `served_mode` says
which search mode the service answers with by default.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from deploy.requests import EXAMPLE_QUERY
from tasks.ops.dag import require_current_evaluation
from tasks.ops.gates import SPLIT_ARTIFACT, Gate, data_validation_gate, trained_sources
from tasks.ops.lineage import INPUTS_ARTIFACT, LOCK_ARTIFACT, PARAMS_ARTIFACT, data_files
from tasks.ops.promote import Candidate, Decision, lineage, move_aliases, register, tag_version
from tasks.ops.registry import current_version, override_reason
from tasks.shared.config.params import Params
from tasks.shared.config.promote_align import PromoteAlignConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.io import link_or_copy, read_json, read_parquet
from tasks.shared.tasks import TASKS
from tasks.shared.tracking import setup_tracking

ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT / "deploy" / "mlflow_encoder.py"
HEADLINE = ("mrr", "recall_at_1", "recall_at_10", "hybrid_mrr", "encoder_size_mb")
"""Test metrics tagged on the registered version (`test_<name>`); the promote run logs all of them."""
VARIANT = "encoder"
INDEX = "index"
"""Where the bundle and the index lie in a registered version (`artifacts/encoder/`, `artifacts/index/`)."""
SMOKE_QUERY = "Return the event loop of the current thread."


def run(
    params: Params,
    params_file: Path = Path("params.yaml"),
    flow_run_id: str | None = None,
    force: bool = False,
    reason: str | None = None,
) -> Decision:
    """Gate the evaluated encoder, register it with its index as @candidate, and make it @champion if every gate
    passes."""
    from mlflow import MlflowClient

    reason = override_reason(force, reason)
    task = TASKS["align"]
    require_current_evaluation(stages=list(task.stages))
    paths, cfg = params.paths, params.promote_align
    metrics_file = Path(paths.metrics) / task.metrics
    evaluation = read_json(metrics_file)
    model_dir, index_dir = Path(paths.align_model), Path(paths.align_index)
    scored = _scored_sha256(evaluation, model_dir, index_dir, metrics_file)
    setup_tracking(params.tracking)
    client, name = MlflowClient(), params.tracking.encoder_model
    champion_mv = current_version(client, name)
    scalars = {k: v for k, v in evaluation.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    why = f"the dual encoder of task align, served as {evaluation.get('served_mode', 'hybrid')} search"
    candidate = Candidate(VARIANT, scalars, {VARIANT: why}, evaluation, metrics_file, HEADLINE)
    gates = [
        data_validation_gate(params.promote, paths),
        bm25_gate(cfg, evaluation),
        index_gate(cfg, evaluation),
        regression_gate(cfg, params, champion_mv),
        smoke_gate(model_dir, index_dir, evaluation.get("served_mode", "hybrid")),
    ]
    decision = Decision(VARIANT, gates, candidate.choice)
    for g in gates:
        print(g)
    decision.lineage = lineage(params, params_file, flow_run_id, scored)
    split = split_record(paths)
    decision.lineage |= {k: split[k] for k in ("test_queries", "test_queries_sha256")}
    records = {
        SPLIT_ARTIFACT: split,
        PARAMS_ARTIFACT: Path(params_file).read_text(encoding="utf-8"),
        INPUTS_ARTIFACT: data_files(),
        LOCK_ARTIFACT: Path("dvc.lock").read_text(encoding="utf-8"),
    }
    with tempfile.TemporaryDirectory(prefix="lmforge-encoder-") as tmp:
        model = pyfunc_model(*registered_layout(model_dir, index_dir, Path(tmp)))
        decision.version = register(name, model, candidate, decision, (force, reason), records)
    tag_version(client, name, candidate, decision)
    client.set_model_version_tag(name, decision.version, "served_mode", str(evaluation.get("served_mode", "hybrid")))
    move_aliases(client, name, decision, str(champion_mv.version) if champion_mv is not None else None, force, reason)
    return decision


def _scored_sha256(evaluation: dict, model_dir: Path, index_dir: Path, metrics_file: Path) -> dict[str, str]:
    """sha256 of the encoder and index folders, which must be what align_evaluate scored."""
    out = {}
    for key, folder in (("encoder_sha256", model_dir), ("index_sha256", index_dir)):
        recorded, actual = evaluation.get(key), tree_sha256(folder)
        if not recorded:
            raise UserError(f"{metrics_file}: records no {key}; run `dvc repro align_evaluate`, then promote")
        if actual != recorded:
            raise UserError(
                f"{folder} is not what align_evaluate scored: sha256 {actual[:12]} now, {recorded[:12]} in "
                f"{metrics_file}; run `dvc repro`, then promote"
            )
        out[key] = actual
    return out


def _versus(evaluation: dict, system: str) -> tuple[float, list[float]] | None:
    """The paired difference of `system`'s test MRR minus BM25's and its 95% interval (None: not measured)."""
    diff, ci = evaluation.get(f"{system}_minus_bm25_mrr"), evaluation.get(f"{system}_minus_bm25_mrr_ci95")
    return None if diff is None or ci is None else (float(diff), [float(c) for c in ci])


def bm25_gate(cfg: PromoteAlignConfig, evaluation: dict) -> Gate:
    """The served mode (dense or hybrid) against BM25 on the same test queries: `better` needs the 95% interval of
    the MRR difference above 0, `not_worse` fails only when it is below 0, `report` shows it."""
    mode = evaluation.get("served_mode", "hybrid")
    if mode == "bm25":
        why = f"the served mode is BM25 itself ({evaluation.get('served_mode_reason', 'chosen on validation')})"
        return Gate("beats_bm25", True, why, cfg.baselines != "report", {"mode": mode})
    versus = _versus(evaluation, mode)
    if versus is None:
        return Gate("beats_bm25", False, f"metrics/align.json has no {mode}_minus_bm25_mrr with its _ci95 interval")
    diff, (lo, hi) = versus
    shown = (
        f"{mode} MRR {evaluation.get('hybrid_mrr' if mode == 'hybrid' else 'mrr', float('nan')):.4f} vs BM25 "
        f"{evaluation.get('bm25_mrr', float('nan')):.4f} (diff {diff:+.4f} [{lo:+.4f}, {hi:+.4f}], "
        f"{evaluation.get('queries', '?')} test queries)"
    )
    detail = {"mode": mode, "diff": diff, "ci95": [lo, hi], "baselines": cfg.baselines}
    if cfg.baselines == "report":
        return Gate("beats_bm25", True, f"report only (promote_align.baselines): {shown}", False, detail)
    failed = lo <= 0 if cfg.baselines == "better" else hi < 0
    verdict = "significantly better than" if cfg.baselines == "better" else "not significantly worse than"
    if failed:
        return Gate("beats_bm25", False, f"{mode} search is not {verdict} BM25: {shown}", True, detail)
    return Gate("beats_bm25", True, f"{mode} search {verdict} BM25: {shown}", True, detail)


def index_gate(cfg: PromoteAlignConfig, evaluation: dict) -> Gate:
    """The approximate index finds at least `min_index_recall` of exact search's top 10."""
    recall = evaluation.get("index_recall_at_10")
    if recall is None:
        return Gate("index_recall", False, "metrics/align.json has no index_recall_at_10")
    shown = f"recall@10 {recall:.4f} of exact search (min {cfg.min_index_recall})"
    return Gate("index_recall", recall >= cfg.min_index_recall, shown, True, {"recall_at_10": recall})


def regression_gate(cfg: PromoteAlignConfig, params: Params, champion_mv) -> Gate:
    """The champion encoder, loaded from the registry, ranks the candidate's test pool for the candidate's test
    queries (dense, exact): fails on an MRR drop of the candidate larger than `max_regression` whose paired 95%
    interval lies below 0."""
    if champion_mv is None:
        return Gate("no_regression", True, "no champion yet: nothing to regress from")
    from tasks.align.retrieval import compare_encoders

    version = str(champion_mv.version)
    try:
        with tempfile.TemporaryDirectory(prefix="lmforge-champion-") as tmp:
            champion = _champion_encoder(params.tracking.encoder_model, version, Path(tmp))
    except Exception as e:  # a champion that cannot be loaded fails the gate with why, never crashes promotion
        return Gate("no_regression", False, f"champion v{version} could not be loaded: {type(e).__name__}: {e}")
    queries = _comparable_queries(params.paths, trained_sources(champion_mv))
    if len(queries) < cfg.min_comparable_queries:
        return Gate(
            "no_regression",
            False,
            f"only {len(queries)} test queries come from files champion v{version} did not train on "
            f"(promote_align.min_comparable_queries {cfg.min_comparable_queries}): not comparable; "
            "`lmforge promote --task align --force --reason ...` to promote anyway",
        )
    from models.dual_encoder import load_encoder

    ours = load_encoder(params.paths.align_model)
    cmp = compare_encoders(ours, champion, params.paths, queries, params.align_evaluate)
    diff, (lo, hi) = cmp["diff"], cmp["ci95"]
    shown = (
        f"MRR {cmp['candidate']:.4f} vs champion v{version} {cmp['champion']:.4f} "
        f"(diff {diff:+.4f} [{lo:+.4f}, {hi:+.4f}])"
    )
    detail = {"champion": version, "queries": len(queries), **cmp}
    if diff < -cfg.max_regression and hi < 0:
        why = f"significantly below champion v{version} by more than {cfg.max_regression} on {len(queries)} queries"
        return Gate("no_regression", False, f"{why}: {shown}", True, detail)
    return Gate("no_regression", True, f"vs champion v{version} on {len(queries)} test queries: {shown}", True, detail)


def _champion_encoder(name: str, version: str, tmp: Path):
    """The registered encoder, downloaded into `tmp` and loaded (safetensors, no pickle)."""
    import mlflow
    from models.dual_encoder import load_encoder

    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp))
    return load_encoder(Path(local) / "artifacts" / VARIANT)


def _pairs(paths):
    return read_parquet(Path(paths.align_data) / "pairs.parquet", ["id", "source", "split"])


def _comparable_queries(paths, trained_on: list[str] | None) -> list[str]:
    """Ids of the candidate's test pairs whose files the champion did not train on."""
    pairs = _pairs(paths)
    test = pairs[pairs["split"] == "test"]
    if trained_on:
        test = test[~test["source"].isin(trained_on)]
    return sorted(test["id"].astype(str))


def split_record(paths) -> dict:
    """Which files held the task's train, validation and test pairs, and a digest of the test pairs' ids."""
    pairs = _pairs(paths)
    sources = {k: sorted(set(pairs.loc[pairs["split"] == k, "source"])) for k in ("train", "val", "test")}
    test_ids = sorted(pairs.loc[pairs["split"] == "test", "id"].astype(str))
    return {
        "test_queries": len(test_ids),
        "test_queries_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
        "sources": sources,
    }


def smoke_gate(model_dir: Path, index_dir: Path, mode: str) -> Gate:
    """Load the candidate and its index with the serving code (deploy/resolve.py, deploy/core.py) and search."""
    from deploy.core import search
    from deploy.resolve import search_folder

    try:
        answer = search(search_folder(model_dir, index_dir), [SMOKE_QUERY], 3, mode)[0]
    except Exception as e:  # any failure to load or answer is the gate's finding, not a crash
        return Gate("smoke_test", False, f"the encoder or its index failed: {type(e).__name__}: {e}")
    hits = answer["results"]
    if not hits or not all("qualname" in h and "score" in h for h in hits):
        return Gate("smoke_test", False, "the search returned no or malformed results")
    shown = ", ".join(h["qualname"] for h in hits)
    return Gate("smoke_test", True, f"loaded and searched ({mode}) {SMOKE_QUERY!r}: {shown}")


def registered_layout(model_dir: Path, index_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """The encoder and index as a registered version holds them (`artifacts/encoder/`, `artifacts/index/`:
    deploy/resolve.py reads them there), hard-linked under `tmp` (copied where links cannot be made)."""
    encoder, index = tmp / VARIANT, tmp / INDEX
    shutil.copytree(model_dir, encoder, copy_function=link_or_copy)
    shutil.copytree(index_dir, index, copy_function=link_or_copy)
    return encoder, index


def pyfunc_model(model_dir: Path, index_dir: Path, root: Path = ROOT) -> dict:
    """`mlflow.pyfunc.log_model` arguments: the encoder folder and the index built with it, models from code."""
    from importlib.metadata import version

    packages = ("torch", "tokenizers", "safetensors", "mlflow", "numpy", "pandas", "pyarrow", "bm25s", "usearch")
    return {
        "python_model": str(Path(root) / MODEL_CODE.relative_to(ROOT)),
        "artifacts": {VARIANT: str(model_dir), INDEX: str(index_dir)},
        "code_paths": [str(Path(root) / "models")],
        "pip_requirements": [f"{p}=={version(p)}" for p in packages],
        "input_example": [EXAMPLE_QUERY],
    }
