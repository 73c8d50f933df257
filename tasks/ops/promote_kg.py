"""promote for task `kg`: gate the evaluated extractor, register it with its graph, move `champion` if it passes.

The same contract as classification's promotion (tasks/ops/promote.py), whose registration, tags, lineage and
alias moves it reuses: DVC must report the task's stages (and the shared ones) up to date, and the extractor
being registered must be the one kg_evaluate scored (sha256). Gates: the data validation of the shared corpus,
beats_baselines (each head against its baseline on the held-out files), no_regression (the champion extractor
loaded from the registry and run again on the candidate's test documents) and a smoke test through the serving
core. The registered version carries the extractor and the graph built with it (`graph.nt`).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from deploy.requests import EXAMPLE_DOCSTRINGS
from models.files import file_sha256
from tasks.kg.rdf import GRAPH_FILE
from tasks.ops.dag import require_current_evaluation
from tasks.ops.gates import SPLIT_ARTIFACT, Gate, data_validation_gate, trained_sources
from tasks.ops.lineage import INPUTS_ARTIFACT, LOCK_ARTIFACT, PARAMS_ARTIFACT, data_files
from tasks.ops.promote import Candidate, Decision, lineage, move_aliases, register, tag_version
from tasks.ops.registry import current_version, override_reason
from tasks.shared.config.params import Params
from tasks.shared.config.promote_kg import PromoteKgConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.io import link_or_copy, read_json, read_parquet
from tasks.shared.stats import holm
from tasks.shared.tasks import TASKS
from tasks.shared.tracking import setup_tracking

ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT / "deploy" / "mlflow_extractor.py"
HEADS = {"entity_f1": "entities", "relation_f1": "relations", "linking_accuracy": "links"}
"""Each head's score in metrics/extract.json and what it scores."""
HEADLINE = ("entity_f1", "relation_f1", "linking_accuracy")
"""Test metrics tagged on the registered version (`test_<name>`); the promote run logs all of them."""
VARIANT = "extractor"


def run(
    params: Params,
    params_file: Path = Path("params.yaml"),
    flow_run_id: str | None = None,
    force: bool = False,
    reason: str | None = None,
) -> Decision:
    """Gate the evaluated extractor, register it as @candidate, and make it @champion if every gate passes."""
    from mlflow import MlflowClient

    reason = override_reason(force, reason)
    task = TASKS["kg"]
    require_current_evaluation(stages=list(task.stages))
    paths, cfg = params.paths, params.promote_kg
    metrics_file = Path(paths.metrics) / task.metrics
    evaluation = read_json(metrics_file)
    model_dir, graph_file = Path(paths.kg_model), Path(paths.kg_graph) / GRAPH_FILE
    scored = {"artifact_sha256": _scored_sha256(evaluation, model_dir, metrics_file)}
    setup_tracking(params.tracking)
    client, name = MlflowClient(), params.tracking.extractor_model
    champion_mv = current_version(client, name)
    scalars = {k: v for k, v in evaluation.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    candidate = Candidate(VARIANT, scalars, {VARIANT: "the extractor of task kg"}, evaluation, metrics_file, HEADLINE)
    gates = [
        data_validation_gate(params.promote, paths),
        baselines_gate(cfg, evaluation),
        regression_gate(cfg, params, client, champion_mv),
        smoke_gate(model_dir),
    ]
    decision = Decision(VARIANT, gates, candidate.choice)
    for g in gates:
        print(g)
    decision.lineage = lineage(params, params_file, flow_run_id, scored | {"graph_sha256": file_sha256(graph_file)})
    split = split_record(paths)
    decision.lineage |= {k: split[k] for k in ("test_docs", "test_docs_sha256")}
    records = {
        SPLIT_ARTIFACT: split,
        PARAMS_ARTIFACT: Path(params_file).read_text(encoding="utf-8"),
        INPUTS_ARTIFACT: data_files(),
        LOCK_ARTIFACT: Path("dvc.lock").read_text(encoding="utf-8"),
    }
    with tempfile.TemporaryDirectory(prefix="lmforge-extractor-") as tmp:
        model = pyfunc_model(*registered_layout(model_dir, graph_file, Path(tmp)))
        decision.version = register(name, model, candidate, decision, (force, reason), records)
    tag_version(client, name, candidate, decision)
    move_aliases(client, name, decision, str(champion_mv.version) if champion_mv is not None else None, force, reason)
    return decision


def _scored_sha256(evaluation: dict, model_dir: Path, metrics_file: Path) -> str:
    """sha256 of the extractor folder, which must be what kg_evaluate scored."""
    recorded, actual = evaluation.get("model_sha256"), tree_sha256(model_dir)
    if not recorded:
        raise UserError(f"{metrics_file}: records no model_sha256; run `dvc repro kg_evaluate`, then promote")
    if actual != recorded:
        raise UserError(
            f"{model_dir} is not what kg_evaluate scored: sha256 {actual[:12]} now, {recorded[:12]} in {metrics_file}; "
            "run `dvc repro`, then promote"
        )
    return actual


def _measured(evaluation: dict) -> dict[str, dict]:
    """Each head scored on the test documents (a user's data without links has no linking score)."""
    return {h: evaluation[f"{h}_vs_baseline"] for h in HEADS if evaluation.get(h) is not None}


def baselines_gate(cfg: PromoteKgConfig, evaluation: dict) -> Gate:
    """Each head against its baseline: paired bootstrap over test documents, Holm over the heads."""
    versus = _measured(evaluation)
    if not versus:
        return Gate("beats_baselines", False, "metrics/extract.json scores no head against a baseline")
    # p_value: one-sided, that the model is not better than its baseline; its mirror tests "significantly worse"
    better = holm({h: v["p_value"] for h, v in versus.items()})
    worse = holm({h: 1.0 - v["p_value"] for h, v in versus.items()})
    shown = "; ".join(
        f"{h} {evaluation[h]:.4f} vs {evaluation[f'{h}_baseline']:.4f} "
        f"(diff {v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], Holm p {better[h]:.4f})"
        for h, v in versus.items()
    )
    failing = {
        "better": [h for h, v in versus.items() if not (v["diff"] > 0 and better[h] < cfg.alpha)],
        "not_worse": [h for h, v in versus.items() if v["diff"] < 0 and worse[h] < cfg.alpha],
        "report": [],
    }[cfg.baselines]
    detail = {"versus": versus, "adjusted_p": better, "mode": cfg.baselines}
    if cfg.baselines == "report":
        return Gate("beats_baselines", True, f"report only (promote_kg.baselines): {shown}", False, detail)
    verdict = "significantly better than" if cfg.baselines == "better" else "not significantly worse than"
    if failing:
        return Gate("beats_baselines", False, f"{', '.join(failing)} not {verdict} the baseline: {shown}", True, detail)
    why = f"every head {verdict} its baseline at alpha {cfg.alpha}: {shown}"
    return Gate("beats_baselines", True, why, True, detail)


def regression_gate(cfg: PromoteKgConfig, params: Params, client, champion_mv) -> Gate:
    """The champion extractor, loaded from the registry, run again on the candidate's test documents and compared
    with the candidate document by document; fails on a significant drop larger than `max_regression`."""
    if champion_mv is None:
        return Gate("no_regression", True, "no champion yet: nothing to regress from")
    from tasks.kg.scoring import compare, document_counts, system_counts

    paths, evaluate = params.paths, params.kg_evaluate
    name, version = params.tracking.extractor_model, str(champion_mv.version)
    try:
        champion = _champion_extractor(name, version)
    except Exception as e:  # a champion that cannot be loaded fails the gate with why, never crashes promotion
        return Gate("no_regression", False, f"champion v{version} could not be loaded: {type(e).__name__}: {e}")
    docs = _comparable_docs(paths, trained_sources(champion_mv))
    if len(docs) < cfg.min_comparable_docs:
        return Gate(
            "no_regression",
            False,
            f"only {len(docs)} test documents come from files champion v{version} did not train on "
            f"(promote_kg.min_comparable_docs {cfg.min_comparable_docs}): not comparable; "
            "`lmforge promote --force --reason ...` to promote anyway",
        )
    ours = system_counts(read_parquet(Path(paths.kg_evaluation) / "predictions.parquet"), "model")
    ours = ours[ours["doc_id"].isin(docs)].sort_values("doc_id", ignore_index=True)
    theirs = document_counts(champion, Path(paths.kg_data), set(ours["doc_id"]))
    theirs = theirs.sort_values("doc_id", ignore_index=True)
    versus = compare(ours, theirs, evaluate.bootstrap_resamples, evaluate.seed)
    return _regression_verdict(cfg, versus, version, len(docs))


def _regression_verdict(cfg: PromoteKgConfig, versus: dict[str, dict], version: str, n: int) -> Gate:
    """Fail on a head whose drop is larger than max_regression and significant (Holm over the heads)."""
    adjusted = holm({h: v["p_value"] for h, v in versus.items()})
    shown = "; ".join(
        f"{h} {v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] (Holm p {adjusted[h]:.4f})"
        for h, v in versus.items()
    )
    dropped = [h for h, v in versus.items() if v["diff"] < -cfg.max_regression and adjusted[h] < cfg.alpha]
    detail = {"versus": versus, "adjusted_p": adjusted, "champion": version, "docs": n}
    if dropped:
        why = f"{', '.join(dropped)} significantly below champion v{version} by more than {cfg.max_regression}"
        return Gate("no_regression", False, f"{why} on {n} documents: {shown}", True, detail)
    return Gate("no_regression", True, f"vs champion v{version} on {n} test documents: {shown}", True, detail)


def _champion_extractor(name: str, version: str):
    """The registered extractor, downloaded into a temporary folder and loaded (safetensors, no pickle)."""
    import mlflow
    from models.extractor import load_extractor

    with tempfile.TemporaryDirectory(prefix="lmforge-champion-") as tmp:
        local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp)
        return load_extractor(Path(local) / "artifacts" / VARIANT)


def _comparable_docs(paths, trained_on: list[str] | None) -> list[str]:
    """Ids of the candidate's test documents whose files the champion did not train on."""
    docs = read_parquet(Path(paths.kg_data) / "docs.parquet", ["id", "source", "split"])
    test = docs[docs["split"] == "test"]
    if trained_on:
        test = test[~test["source"].isin(trained_on)]
    return sorted(test["id"])


def split_record(paths) -> dict:
    """Which files held the task's train, validation and test documents, and a digest of the test documents' ids."""
    docs = read_parquet(Path(paths.kg_data) / "docs.parquet", ["id", "source", "split"])
    sources = {k: sorted(set(docs.loc[docs["split"] == k, "source"])) for k in ("train", "val", "test")}
    test_ids = sorted(docs.loc[docs["split"] == "test", "id"].astype(str))
    return {
        "test_docs": len(test_ids),
        "test_docs_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
        "sources": sources,
    }


def smoke_gate(model_dir: Path) -> Gate:
    """Load the candidate with the serving core's loader and extract from an example text."""
    from models.extractor import load_extractor

    text = "Return a new Message object. Raises ValueError if the header is not valid."
    try:
        out = load_extractor(model_dir).extract([text])
    except Exception as e:  # any failure to load or answer is the gate's finding, not a crash
        return Gate("smoke_test", False, f"the extractor failed: {type(e).__name__}: {e}")
    if len(out) != 1 or not isinstance(out[0].get("entities"), list):
        return Gate("smoke_test", False, "the extractor returned malformed output")
    found = ", ".join(f"{e['text']}:{e['label']}" for e in out[0]["entities"]) or "no entities"
    return Gate("smoke_test", True, f"the extractor loaded and answered an example ({found})")


def registered_layout(model_dir: Path, graph_file: Path, tmp: Path) -> tuple[Path, Path]:
    """The extractor and graph as a registered version holds them (`artifacts/extractor/`, `artifacts/graph/graph.nt`:
    deploy/resolve.py reads them there), hard-linked under `tmp` (copied where links cannot be made)."""
    extractor, graph = tmp / VARIANT, tmp / "graph"
    shutil.copytree(model_dir, extractor, copy_function=link_or_copy)
    graph.mkdir()
    link_or_copy(graph_file, graph / GRAPH_FILE)
    return extractor, graph


def pyfunc_model(model_dir: Path, graph_dir: Path, root: Path = ROOT) -> dict:
    """`mlflow.pyfunc.log_model` arguments: the extractor folder and the graph built with it (a folder holding
    graph.nt), models from code; MLflow stores each under `artifacts/<folder name>`."""
    from importlib.metadata import version

    return {
        "python_model": str(Path(root) / MODEL_CODE.relative_to(ROOT)),
        "artifacts": {VARIANT: str(model_dir), "graph": str(graph_dir)},
        "code_paths": [str(Path(root) / "models")],
        "pip_requirements": [
            f"{p}=={version(p)}" for p in ("torch", "tokenizers", "safetensors", "mlflow", "numpy", "pandas", "pyarrow")
        ],
        "input_example": EXAMPLE_DOCSTRINGS,
    }
