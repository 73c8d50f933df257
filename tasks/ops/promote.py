"""promote: gate the evaluated candidate, register it in MLflow, and move `champion` only if it passes.

Not a DVC stage (it changes the registry, outside the workspace): the Prefect flow calls it after
evaluate, and `lmforge promote` runs it by hand after `dvc repro`. Every candidate becomes a
registered model version tagged with its gate results (tasks/ops/gates.py) and lineage
(tasks/ops/lineage.py), and gets the alias `candidate`; only a candidate that passes every gate gets
`champion` (or one forced with a reason, recorded as an override). `lmforge rollback`
(tasks/ops/rollback.py) moves `champion` back; `lmforge history` prints every move of both aliases
(tasks/ops/registry.py).

Promotion acts only on evidence that describes what it registers: DVC must report every stage up
to date (so metrics/evaluate.json and the dvc.lock lineage belong to the workspace's artifacts), and
the sha256 of the variant, tokenizer and labeled data must equal the hashes evaluate recorded for
what it scored. Otherwise it refuses in one line and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from deploy.requests import EXAMPLE_INPUT
from models.tokenizer import TOKENIZER_FILE
from tasks.ops.dag import require_current_evaluation, stage_names
from tasks.ops.gates import (
    SPLIT_ARTIFACT,
    Gate,
    baseline_verdict,
    champion_gates,
    data_validation_gate,
    metric_gates,
    rescore_champion,
    smoke_gate,
)
from tasks.ops.lineage import (
    DIRTY_TAG,
    INPUTS_ARTIFACT,
    LOCK_ARTIFACT,
    PARAMS_ARTIFACT,
    PRECISION_TAG,
    data_files,
    precisions,
    uncommitted_code,
)
from tasks.ops.lineage import tags as lineage_tags
from tasks.ops.registry import ALIAS, CANDIDATE, current_version, move_alias, move_champion, override_reason
from tasks.shared.config.params import Params
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.io import read_json, read_parquet
from tasks.shared.tasks import TASKS
from tasks.shared.tracking import PARENT_RUN_ENV, git_commit, numeric, setup_tracking
from tasks.shared.validation import read_result
from tasks.shared.variants import folders as variant_folders

ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT / "deploy" / "mlflow_model.py"
HEADLINE = ("accuracy", "macro_f1", "p50_ms_b1", "size_mb")
"""The classifier's test metrics tagged on its version (`test_<name>`: what the gates and /metadata read); the
promote run logs all of them."""
MAX_VERSION_TAGS = 40
"""At most this many tags on a registered version: the rest of the record is in the promote run's artifacts."""


@dataclass
class Decision:
    variant: str
    gates: list[Gate]
    choice: dict[str, str] = field(default_factory=dict)
    """Why each evaluated variant was or was not the one registered."""
    version: str | None = None
    promoted: bool = False
    overridden: bool = False
    """@champion moved although a gate failed (`lmforge promote --force --reason`)."""
    lineage: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed(self) -> list[str]:
        return [g.name for g in self.gates if not g.passed]


def choose_variant(cfg: PromoteConfig, variants: dict[str, dict]) -> tuple[str, dict[str, str]]:
    """The variant to register and, for every evaluated variant, why it won or lost.

    A named `promote.variant` is taken as is. `auto` keeps the variants whose macro-F1 is within
    `f1_tolerance` of the best, whose batch-1 latency and size fit the budgets, whose behavioral tests
    pass and that stand against the trained baselines as `promote.baselines` asks, and takes the fastest
    of them at batch 1; if none qualifies, the best macro-F1 (its gates then say what fails).
    """
    if not variants:
        raise UserError("metrics/evaluate.json: no variant was evaluated; run `dvc repro evaluate`")
    if cfg.variant != "auto":
        if cfg.variant not in variants:
            raise UserError(
                f"params.yaml: promote.variant: {cfg.variant!r} was not evaluated (have {sorted(variants)})"
            )
        return cfg.variant, {
            cfg.variant: "named in promote.variant",
            **{v: f"not chosen: promote.variant names {cfg.variant}" for v in variants if v != cfg.variant},
        }
    top = max(variants, key=lambda v: variants[v]["macro_f1"])
    floor = round(variants[top]["macro_f1"] - cfg.f1_tolerance, 6)
    why, eligible = {}, []
    for v, m in variants.items():
        behavior = m.get("behavioral_min_pass_rate")
        if m["macro_f1"] < floor:
            why[v] = (
                f"macro-F1 {m['macro_f1']:.4f} is more than {cfg.f1_tolerance:.4f} below the best "
                f"({top} {variants[top]['macro_f1']:.4f})"
            )
        elif m["p50_ms_b1"] > cfg.max_latency_ms:
            why[v] = f"p50 {m['p50_ms_b1']:.2f} ms over the latency budget {cfg.max_latency_ms:.2f} ms"
        elif m["size_mb"] > cfg.max_size_mb:
            why[v] = f"{m['size_mb']:.2f} MB over the size budget {cfg.max_size_mb:.2f} MB"
        elif behavior is not None and behavior < cfg.min_behavioral_pass_rate:
            why[v] = f"behavioral tests pass {behavior:.3f} of cases, below {cfg.min_behavioral_pass_rate:.3f}"
        elif lost := _lost_to_baselines(cfg, m):
            why[v] = lost
        else:
            eligible.append(v)
    if not eligible:
        why[top] = f"best macro-F1 ({variants[top]['macro_f1']:.4f}); no variant qualified, so its gates decide"
        return top, why
    pick = min(eligible, key=lambda v: (variants[v]["p50_ms_b1"], -variants[v]["macro_f1"]))
    fast = variants[pick]["p50_ms_b1"]
    for v in eligible:
        why[v] = (
            f"chosen: fastest qualifying variant (p50 {fast:.3f} ms at batch 1, "
            f"macro-F1 {variants[v]['macro_f1']:.4f}, within {cfg.f1_tolerance:.4f} of the best)"
            if v == pick
            else f"qualified but slower: p50 {variants[v]['p50_ms_b1']:.3f} ms vs {fast:.3f} ms ({pick})"
        )
    return pick, why


def _lost_to_baselines(cfg: PromoteConfig, m: dict) -> str | None:
    """Why a variant does not stand against the trained baselines as `promote.baselines` asks, or None."""
    if cfg.baselines == "report" or not m.get("vs_baselines"):
        return None
    passed, _, detail = baseline_verdict(cfg, m["vs_baselines"])
    return None if passed else detail["verdict"]


def verify_scored(evaluation: dict, name: str, path: Path, metrics_file: Path) -> str:
    """sha256 of `path` (the copy being registered), which must equal what evaluate recorded for `name`."""
    recorded = (evaluation.get("artifacts") or {}).get(name, {}).get("sha256")
    if not recorded:
        raise UserError(
            f"{metrics_file}: records no sha256 for {name!r} (written by an older lmforge); "
            "run `dvc repro evaluate`, then promote"
        )
    actual = tree_sha256(path)
    if actual != recorded:
        raise UserError(
            f"{name} is not what evaluate scored: sha256 {actual[:12]} now, {recorded[:12]} in {metrics_file}; "
            "run `dvc repro`, then promote"
        )
    return actual


@dataclass
class Candidate:
    """What evaluate says about the variant to register: its metrics and why it was chosen."""

    variant: str
    metrics: dict
    choice: dict[str, str]
    evaluation: dict
    metrics_file: Path
    headline: tuple[str, ...] = HEADLINE
    """Its metrics tagged on the version (`test_<name>`)."""

    @property
    def scalars(self) -> dict:
        """Its flat metrics (numbers and strings), as tags and logged metrics."""
        return {k: v for k, v in self.metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def run(
    params: Params,
    params_file: Path = Path("params.yaml"),
    flow_run_id: str | None = None,
    force: bool = False,
    reason: str | None = None,
) -> Decision:
    """Gate the evaluated candidate, register it as @candidate, and make it @champion if every gate passes.

    `force` (with a `reason`) moves @champion even when gates fail; the override is recorded on the version
    and in the alias history. Without `force`, a `reason` is added to the history record of a promotion.
    """
    from mlflow import MlflowClient

    reason = override_reason(force, reason)
    require_current_evaluation(stages=list(TASKS["classification"].stages))
    candidate = evaluated_candidate(params)
    setup_tracking(params.tracking)
    client = MlflowClient()
    name = params.tracking.registered_model
    champion_mv = current_version(client, name)
    folder = variant_folders(params.paths).get(candidate.variant)
    if folder is None:
        raise UserError(
            f"{candidate.metrics_file}: variant {candidate.variant!r} is not one lmforge builds "
            f"(have {sorted(variant_folders(params.paths))})"
        )
    with tempfile.TemporaryDirectory(prefix="lmforge-bundle-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        scored = build_bundle(params, candidate, Path(folder), bundle_dir)
        gates = gate(params, candidate, bundle_dir, client, champion_mv)
        decision = Decision(candidate.variant, gates, candidate.choice)
        for g in decision.gates:
            print(g)
        decision.lineage = lineage(params, params_file, flow_run_id, scored)
        split = split_record(params.paths)
        decision.lineage |= {k: split[k] for k in ("test_rows", "test_rows_sha256")}  # the rest: split.json
        records = {
            SPLIT_ARTIFACT: split,
            PARAMS_ARTIFACT: Path(params_file).read_text(encoding="utf-8"),
            INPUTS_ARTIFACT: data_files(),
            LOCK_ARTIFACT: Path("dvc.lock").read_text(encoding="utf-8"),
        }
        decision.version = register(name, pyfunc_model(bundle_dir), candidate, decision, (force, reason), records)
    tag_version(client, name, candidate, decision)
    move_aliases(client, name, decision, str(champion_mv.version) if champion_mv is not None else None, force, reason)
    return decision


def evaluated_candidate(params: Params) -> Candidate:
    """The variant to register, chosen from metrics/evaluate.json (each other variant printed with why not)."""
    metrics_file = Path(params.paths.metrics) / "evaluate.json"
    evaluation = read_json(metrics_file)
    variant, choice = choose_variant(params.promote, evaluation["variants"])
    print(f"variant: {variant} (promote.variant: {params.promote.variant})")
    for v, why in choice.items():
        if v != variant:
            print(f"  {v}: {why}")
    return Candidate(variant, evaluation["variants"][variant], choice, evaluation, metrics_file)


def build_bundle(params: Params, candidate: Candidate, folder: Path, bundle_dir: Path) -> dict[str, str]:
    """Write the servable bundle (with the clean stage's text normalization) and check it is what evaluate
    scored; returns the sha256 of its parts."""
    paths, evaluation, metrics_file = params.paths, candidate.evaluation, candidate.metrics_file
    write_servable(params, folder, bundle_dir)
    return {
        "artifact_sha256": verify_scored(evaluation, candidate.variant, bundle_dir / "classifier", metrics_file),
        "tokenizer_sha256": verify_scored(evaluation, "tokenizer", bundle_dir / TOKENIZER_FILE, metrics_file),
        "test_data_sha256": verify_scored(evaluation, "labeled_data", Path(paths.clean_labeled), metrics_file),
    }


def write_servable(params: Params, folder: Path, bundle_dir: Path, root: Path = Path(".")) -> None:
    """The bundle of the variant in `folder` as promote registers it: tokenizer, classifier, LM and the clean
    stage's text normalization (stage outputs under `root`; `lmforge verify` builds one from a rebuild)."""
    from deploy.resolve import write_preprocess
    from models.bundle import write_bundle

    paths, root = params.paths, Path(root)
    write_bundle(bundle_dir, root / paths.tokenizer / TOKENIZER_FILE, root / folder, root / paths.lm)
    write_preprocess(bundle_dir, {"unicode_form": params.clean.unicode_form, "tab_size": params.clean.tab_size})


def gate(params: Params, candidate: Candidate, bundle_dir: Path, client, champion_mv) -> list[Gate]:
    """Every gate on the candidate, the current champion scored again on the same test rows."""
    from deploy.resolve import load_service_bundle

    cfg, paths, evaluation = params.promote, params.paths, candidate.evaluation
    if champion_mv is not None:
        print(f"scoring champion v{champion_mv.version} again on the candidate's test rows")
    labels = list(candidate.metrics.get("per_class_f1") or load_service_bundle(str(bundle_dir)).labels)
    champion = rescore_champion(client, params.tracking.registered_model, champion_mv, paths, params.evaluate, labels)
    test = candidate_predictions(paths, candidate.variant)
    versus = champion_gates(cfg, test, champion, params.evaluate.bootstrap_resamples, params.evaluate.seed)
    majority, lm = evaluation["baselines"]["majority"], evaluation.get("language_model")
    return [
        data_validation_gate(cfg, paths),
        *metric_gates(cfg, candidate.metrics, majority, versus, lm),
        smoke_gate(bundle_dir),
    ]


def candidate_predictions(paths, variant: str):
    """The variant's test predictions as evaluate wrote them (`predictions.parquet`): id, source, label, pred."""
    column = f"pred_{variant}"
    table = read_parquet(paths.predictions, ["id", "source", "label", column])
    return table[["id", "source", "label"]].assign(pred=table[column])


def split_record(paths) -> dict:
    """Which source files held the train, validation and test rows, and digests of the test rows' ids and files:
    logged with every version (`split.json`) so a later candidate's no_regression can tell whether this version
    trained on what is then test data."""
    data = read_parquet(paths.clean_labeled, ["id", "source", "split"])
    sources = {k: sorted(set(data.loc[data["split"] == k, "source"])) for k in ("train", "val", "test")}
    test_ids = sorted(data.loc[data["split"] == "test", "id"].astype(str))
    return {
        "test_rows": len(test_ids),
        "test_rows_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
        "test_sources_sha256": hashlib.sha256("\n".join(sources["test"]).encode()).hexdigest(),
        "sources": sources,
    }


def lineage(params: Params, params_file: Path, flow_run_id: str | None, scored: dict[str, str]) -> dict:
    """What the candidate was built from: commit, params, validation, runs, hashes, DVC fingerprint."""
    paths = params.paths
    validation_ok = read_result(paths.validation)["success"] if Path(paths.validation).exists() else None
    dirty = uncommitted_code()
    return {
        "git_commit": git_commit(),
        DIRTY_TAG: "unknown" if dirty is None else ", ".join(dirty) or "no",
        "params_sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest(),
        "ge_success": str(validation_ok),
        "prefect_flow_run_id": flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID", ""),
        "mlflow_parent_run_id": os.environ.get(PARENT_RUN_ENV) or "",
        **scored,
        **lineage_tags(),
        PRECISION_TAG: json.dumps(precisions(paths.metrics, stage_names()), sort_keys=True),
    }


def register(
    name: str,
    model: dict,
    candidate: Candidate,
    decision: Decision,
    override: tuple[bool, str],
    records: dict[str, dict | str],
) -> str:
    """Log `model` (`mlflow.pyfunc.log_model` arguments) in a `promote` run (nested under the pipeline's) and
    register it, with `records` beside it (artifact name -> a dict logged as JSON, or text): the split its
    no_regression needs later and what `lmforge verify` rebuilds it from (the params file, the md5 of every input
    file, dvc.lock); returns the new version, whose description (and the run's) is the gate table.
    `override`: (force, reason) as given to `run`."""
    import mlflow
    from mlflow import MlflowClient

    gates = decision.gates
    parent = os.environ.get(PARENT_RUN_ENV)
    description = gate_table(name, candidate.variant, decision)
    with mlflow.start_run(
        run_name="promote",
        parent_run_id=parent or None,
        nested=mlflow.active_run() is not None,
        tags={"lmforge.stage": "promote"},
        description=description,
    ) as run_:
        info = mlflow.pyfunc.log_model(name="model", registered_model_name=name, **model)
        version = str(info.registered_model_version)
        MlflowClient().update_model_version(name, version, description=description)
        for artifact, record in records.items():
            if isinstance(record, dict):
                mlflow.log_dict(record, artifact)
            else:
                mlflow.log_text(record, artifact)
        mlflow.log_metrics({f"test_{k}": v for k, v in numeric(candidate.scalars).items()})
        force, reason = override
        report = {"gates": [g.as_dict() for g in gates], "choice": candidate.choice, "force": force, "reason": reason}
        mlflow.log_dict({"variant": candidate.variant, **report}, "gates.json")
        mlflow.set_tags({f"gate.{g.name}": g.status for g in gates})
        decision.lineage["mlflow_promote_run_id"] = run_.info.run_id
    return version


def gate_table(name: str, variant: str, decision: Decision) -> str:
    """The gates as a Markdown table (the registered version's and the promote run's description)."""
    verdict = "every gate passed" if decision.passed else f"failed: {', '.join(decision.failed)}"
    lines = [f"**{name}** ({variant}): {verdict}", "", "| gate | status | reason |", "|---|---|---|"]
    for g in decision.gates:
        reason = " ".join(g.reason.split()).replace("|", "\\|")
        lines.append(f"| {g.name} | {g.status} | {reason} |")
    return "\n".join(lines) + "\n"


def version_tags(candidate: Candidate, decision: Decision) -> dict[str, str]:
    """The registered version's tags (at most MAX_VERSION_TAGS): variant, verdict, why chosen, its headline test
    metrics, each gate (and its adjusted p-values), the lineage (an entry without a value, such as the Prefect flow run
    of a promotion by hand, is left out). The other variants' `choice`, every metric and the gates' details are in the
    promote run (`gates.json`, its metrics)."""
    scalars = candidate.scalars
    return {
        "variant": candidate.variant,
        "gates": "passed" if decision.passed else "failed",
        "choice": candidate.choice.get(candidate.variant, ""),
        **{f"test_{k}": str(scalars[k]) for k in candidate.headline if k in scalars},
        **{f"gate.{g.name}": f"{g.status}: {g.reason}" for g in decision.gates},
        **{
            f"gate.{g.name}.p_values": json.dumps(g.detail["adjusted_p"])
            for g in decision.gates
            if "adjusted_p" in g.detail
        },
        **{k: str(v) for k, v in decision.lineage.items() if v not in ("", None)},
    }


def tag_version(client, name: str, candidate: Candidate, decision: Decision) -> None:
    """Set `version_tags` on the registered version."""
    for k, v in version_tags(candidate, decision).items():
        client.set_model_version_tag(name, decision.version, k[:250], v[:5000])


def move_aliases(client, name: str, decision: Decision, previous: str | None, force: bool, reason: str) -> None:
    """@candidate to the new version; @champion too if every gate passed (or `force`d, recorded as an override)."""
    version, variant = decision.version, decision.variant
    verdict = "passed" if decision.passed else "failed"
    failed = ", ".join(decision.failed)
    last = current_version(client, name, CANDIDATE)
    evaluated = f"evaluated: gates {verdict}" + (f" ({failed})" if failed else "") + f"; {variant}"
    move_alias(client, name, CANDIDATE, version, evaluated, str(last.version) if last else None, action="evaluate")
    if decision.passed:
        why = f"promoted: every gate passed ({variant})" + (f"; {reason}" if reason else "")
        move_champion(client, name, version, why, previous)
        decision.promoted = True
        print(f"promoted {name} v{version} ({variant}) to @{ALIAS}; @{CANDIDATE} too")
    elif force:
        move_champion(client, name, version, f"forced over failed gates ({failed}): {reason}", previous, override=True)
        decision.promoted = decision.overridden = True
        print(
            f"promoted {name} v{version} ({variant}) to @{ALIAS} OVERRIDING failed gates ({failed}); recorded: {reason}"
        )
    else:
        kept = f" (v{previous})" if previous else ""
        print(
            f"not promoted: {name} v{version} ({variant}) failed {failed}; "
            f"@{ALIAS} unchanged{kept}, @{CANDIDATE} -> v{version}"
        )


def pyfunc_model(bundle_dir: Path, root: Path = ROOT) -> dict:
    """What a registered model holds beside its bundle: `mlflow.pyfunc` arguments shared by `register` (from
    this checkout) and `lmforge verify` (from the rebuilt one, `root`)."""
    return {
        "python_model": str(Path(root) / MODEL_CODE.relative_to(ROOT)),
        "artifacts": {"bundle": str(bundle_dir)},
        "code_paths": [str(Path(root) / "models")],
        "pip_requirements": _requirements(),
        "input_example": EXAMPLE_INPUT,
    }


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "tokenizers", "safetensors", "mlflow", "numpy")]
