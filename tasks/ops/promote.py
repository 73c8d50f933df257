"""promote: gate the evaluated candidate, register it in MLflow, and move `champion` only if it passes.

Not a DVC stage (it changes the registry, outside the workspace): the Prefect flow calls it after
evaluate, and `lmforge promote` runs it by hand after `dvc repro`. Every candidate becomes a
registered model version tagged with its gate results and lineage; only a candidate that passes
every gate gets the alias. `lmforge rollback` (tasks/ops/rollback.py) moves the alias back.

Promotion acts only on evidence that describes what it registers: DVC must report every stage up
to date (so metrics/evaluate.json and the dvc.lock lineage belong to the workspace's artifacts), and
the sha256 of the variant and tokenizer copied into the registered bundle must equal the hashes
evaluate recorded for what it scored. Otherwise it refuses in one line and registers nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


from models.tokenizer import TOKENIZER_FILE
from tasks.ops.lineage import read_lock
from tasks.ops.lineage import tags as lineage_tags
from tasks.shared.config.params import Params
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.io import read_json
from tasks.shared.tracking import PARENT_RUN_ENV, git_commit, numeric, setup_tracking
from tasks.shared.variants import folders as variant_folders
from tasks.shared.validation import read_result

ALIAS = "champion"
ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT / "deploy" / "mlflow_model.py"


@dataclass
class Gate:
    name: str
    passed: bool
    reason: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.reason}"


@dataclass
class Decision:
    variant: str
    gates: list[Gate]
    choice: dict[str, str] = field(default_factory=dict)
    """Why each evaluated variant was or was not the one registered."""
    version: str | None = None
    promoted: bool = False
    lineage: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)


def choose_variant(cfg: PromoteConfig, variants: dict[str, dict]) -> tuple[str, dict[str, str]]:
    """The variant to register and, for every evaluated variant, why it won or lost.

    A named `promote.variant` is taken as is. `auto` keeps the variants whose macro-F1 is within
    `f1_tolerance` of the best, whose batch-1 latency and size fit the budgets and whose behavioral tests
    pass, and takes the fastest of them at batch 1; if none qualifies, the best macro-F1 (its gates then
    say what fails).
    """
    if not variants:
        raise UserError("metrics/evaluate.json: no variant was evaluated; run `dvc repro evaluate`")
    if cfg.variant != "auto":
        if cfg.variant not in variants:
            raise UserError(f"params.yaml: promote.variant: {cfg.variant!r} was not evaluated (have {sorted(variants)})")
        return cfg.variant, {cfg.variant: "named in promote.variant", **{v: f"not chosen: promote.variant names {cfg.variant}" for v in variants if v != cfg.variant}}
    top = max(variants, key=lambda v: variants[v]["macro_f1"])
    floor = round(variants[top]["macro_f1"] - cfg.f1_tolerance, 6)
    why, eligible = {}, []
    for v, m in variants.items():
        behavior = m.get("behavioral_min_pass_rate")
        if m["macro_f1"] < floor:
            why[v] = f"macro-F1 {m['macro_f1']:.4f} is more than {cfg.f1_tolerance:.4f} below the best ({top} {variants[top]['macro_f1']:.4f})"
        elif m["p50_ms_b1"] > cfg.max_latency_ms:
            why[v] = f"p50 {m['p50_ms_b1']:.2f} ms over the latency budget {cfg.max_latency_ms:.2f} ms"
        elif m["size_mb"] > cfg.max_size_mb:
            why[v] = f"{m['size_mb']:.2f} MB over the size budget {cfg.max_size_mb:.2f} MB"
        elif behavior is not None and behavior < cfg.min_behavioral_pass_rate:
            why[v] = f"behavioral tests pass {behavior:.3f} of cases, below {cfg.min_behavioral_pass_rate:.3f}"
        else:
            eligible.append(v)
    if not eligible:
        why[top] = f"best macro-F1 ({variants[top]['macro_f1']:.4f}); no variant qualified, so its gates decide"
        return top, why
    pick = min(eligible, key=lambda v: (variants[v]["p50_ms_b1"], -variants[v]["macro_f1"]))
    fast = variants[pick]["p50_ms_b1"]
    for v in eligible:
        why[v] = (
            f"chosen: fastest qualifying variant (p50 {fast:.3f} ms at batch 1, macro-F1 {variants[v]['macro_f1']:.4f}, within {cfg.f1_tolerance:.4f} of the best)"
            if v == pick
            else f"qualified but slower: p50 {variants[v]['p50_ms_b1']:.3f} ms vs {fast:.3f} ms ({pick})"
        )
    return pick, why


def metric_gates(cfg: PromoteConfig, m: dict, majority: dict, champion: dict | None, validation_ok: bool | None) -> list[Gate]:
    """The gates that depend only on numbers (no I/O): easy to test, printed with their reasons."""
    gates = []
    if cfg.require_validation:
        gates.append(Gate("data_validation", bool(validation_ok), "Great Expectations suites passed" if validation_ok else "data validation did not pass"))
    gates.append(Gate("min_accuracy", m["accuracy"] >= cfg.min_accuracy, f"accuracy {m['accuracy']:.4f} vs floor {cfg.min_accuracy:.4f}"))
    gates.append(Gate("min_macro_f1", m["macro_f1"] >= cfg.min_macro_f1, f"macro-F1 {m['macro_f1']:.4f} vs floor {cfg.min_macro_f1:.4f}"))
    gain = round(m["accuracy"] - majority["accuracy"], 6)  # exact-boundary values pass despite float noise
    gates.append(Gate("beats_majority", gain >= cfg.min_gain_over_majority, f"accuracy gain over majority class {gain:+.4f} vs required {cfg.min_gain_over_majority:+.4f}"))
    if champion is None:
        gates.append(Gate("no_regression", True, "no current champion"))
    else:
        drop = round(champion["macro_f1"] - m["macro_f1"], 6)
        gates.append(
            Gate("no_regression", drop <= cfg.max_regression, f"macro-F1 {m['macro_f1']:.4f} vs champion v{champion['version']} {champion['macro_f1']:.4f} (allowed drop {cfg.max_regression:.4f})")
        )
    gates.append(Gate("latency", m["p50_ms_b1"] <= cfg.max_latency_ms, f"p50 {m['p50_ms_b1']:.2f} ms (one text) vs budget {cfg.max_latency_ms:.2f} ms"))
    gates.append(Gate("size", m["size_mb"] <= cfg.max_size_mb, f"{m['size_mb']:.2f} MB vs budget {cfg.max_size_mb:.2f} MB"))
    behavior = m.get("behavioral_min_pass_rate")
    if behavior is None:
        gates.append(Gate("behavioral", True, "no behavioral test could run (no applicable cases)"))
    else:
        worst = _worst_behavioral(m.get("behavioral") or {})
        gates.append(Gate("behavioral", behavior >= cfg.min_behavioral_pass_rate, f"lowest pass rate {behavior:.3f}{worst} vs floor {cfg.min_behavioral_pass_rate:.3f}"))
    return gates


def _worst_behavioral(report: dict) -> str:
    """` (<test>)` naming the behavioral test with the lowest pass rate."""
    rates = {name: r.get("pass_rate") for name, r in (report.get("invariance") or {}).items()}
    rates["minimum_functionality"] = (report.get("mft") or {}).get("pass_rate")
    rates = {k: v for k, v in rates.items() if v is not None}
    return f" ({min(rates, key=rates.get)})" if rates else ""


def smoke_gate(bundle_dir: Path) -> Gate:
    """Load the candidate with the BentoML service's own code and answer its example requests."""
    from deploy.service import EXAMPLE_INPUT, EXAMPLE_PROMPT, load_service_bundle

    try:
        bundle = load_service_bundle(str(bundle_dir))
        preds = bundle.classify(EXAMPLE_INPUT)
        ok = len(preds) == len(EXAMPLE_INPUT) and all(
            p.label in bundle.labels and abs(sum(p.probabilities.values()) - 1) < 1e-3 for p in preds
        )
        text = bundle.generate(EXAMPLE_PROMPT, max_new_tokens=8, seed=0) if bundle.can_generate else None
    except Exception as e:  # any failure to load or answer is the gate's finding, not a crash
        return Gate("smoke_test", False, f"service code failed on the candidate: {type(e).__name__}: {e}")
    if not ok:
        return Gate("smoke_test", False, "service code returned malformed predictions")
    generated = f"generated {len(text)} chars" if text is not None else "no /generate (masked-LM trunk)"
    return Gate("smoke_test", True, f"service code loaded it, classified {len(preds)} texts, {generated}")


def current_version(client, name: str):
    """The model version @champion points at, or None (no model, no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def current_champion(client, name: str) -> dict | None:
    mv = current_version(client, name)
    if mv is None:
        return None
    try:
        f1 = float(mv.tags.get("test_macro_f1", "nan"))
    except ValueError:
        return None
    return {"version": str(mv.version), "macro_f1": f1}


HISTORY_TAG = "champion.history."
"""Registered-model tags `champion.history.<ns since epoch>`: one JSON record per move of @champion."""


def move_champion(client, name: str, version: str, reason: str, previous: str | None, override: bool = False) -> None:
    """Point @champion at `version`, recording when, from which version, why and whether gates were overridden.

    The record is written before the alias moves, so no move (least of all an override) goes unrecorded.
    """
    import getpass
    import time
    from datetime import datetime, timezone

    event = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "from": previous,
        "to": str(version),
        "reason": reason,
        "override": override,
        "user": getpass.getuser(),
    }
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{time.time_ns()}", json.dumps(event))
    if override:
        client.set_model_version_tag(name, str(version), "override", f"{event['time']} {event['user']}: {reason}"[:5000])
    client.set_registered_model_alias(name, ALIAS, str(version))


def alias_history(client, name: str) -> list[dict]:
    """Every recorded move of @champion, oldest first."""
    model = client.get_registered_model(name)
    events = [(k, v) for k, v in (model.tags or {}).items() if k.startswith(HISTORY_TAG)]
    return [json.loads(v) for _, v in sorted(events, key=lambda kv: int(kv[0][len(HISTORY_TAG) :]))]


def dvc_lineage(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of every stage dependency and output recorded in dvc.lock."""
    return {
        f"dvc.{stage}.{kind}.{item['path']}": item["md5"]
        for stage, body in read_lock(lock_file).items()
        for kind in ("deps", "outs")
        for item in body.get(kind) or []
        if "md5" in item
    }


def stale_stages(root: Path = Path(".")) -> dict[str, list]:
    """`dvc status` of the pipeline: stage -> what changed since dvc.lock recorded it (empty: all up to date)."""
    from tasks.ops.dag import dvc_command

    res = subprocess.run(dvc_command("status", "--json"), cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr or res.stdout).strip().splitlines()[-1:] or [f"exit code {res.returncode}"]
        raise UserError(f"dvc status failed: {last[0]}")
    try:
        status = json.loads(res.stdout or "{}")
    except ValueError:
        raise UserError(f"dvc status printed something that is not JSON: {res.stdout[:200]!r}") from None
    return {k: v for k, v in status.items() if v}


def _describe(changes: list) -> str:
    """The first change DVC reports for a stage, e.g. `changed deps: data/models/classifier (modified)`."""
    for change in changes:
        if isinstance(change, dict):
            for kind, what in change.items():
                if isinstance(what, dict) and what:
                    path, how = next(iter(what.items()))
                    return f"{kind}: {path} ({how})"
                return str(kind)
        return str(change)
    return "changed"


def require_current_evaluation(root: Path = Path(".")) -> None:
    """Refuse unless DVC reports every stage up to date (evaluation and lineage describe the workspace)."""
    stale = stale_stages(root)
    if stale:
        first = next(iter(stale))
        raise UserError(
            f"the evaluation is not evidence for the current artifacts: dvc status reports {len(stale)} stage(s) out of date "
            f"({', '.join(stale)}; {first}: {_describe(stale[first])}); run `dvc repro` (or `make pipeline`), then promote"
        )


def verify_scored(evaluation: dict, name: str, path: Path, metrics_file: Path) -> str:
    """sha256 of `path` (the copy being registered), which must equal what evaluate recorded for `name`."""
    recorded = (evaluation.get("artifacts") or {}).get(name, {}).get("sha256")
    if not recorded:
        raise UserError(f"{metrics_file}: records no sha256 for {name!r} (written by an older lmforge); run `dvc repro evaluate`, then promote")
    actual = tree_sha256(path)
    if actual != recorded:
        raise UserError(f"{name} is not what evaluate scored: sha256 {actual[:12]} now, {recorded[:12]} in {metrics_file}; run `dvc repro`, then promote")
    return actual


def run(params: Params, params_file: Path = Path("params.yaml"), flow_run_id: str | None = None) -> Decision:
    import mlflow
    from mlflow import MlflowClient

    from models.bundle import write_bundle

    cfg, paths = params.promote, params.paths
    require_current_evaluation()
    metrics_file = Path(paths.metrics) / "evaluate.json"
    evaluation = read_json(metrics_file)
    validation_ok = read_result(paths.validation)["success"] if Path(paths.validation).exists() else None
    variant, choice = choose_variant(cfg, evaluation["variants"])
    m = evaluation["variants"][variant]
    print(f"variant: {variant} (promote.variant: {cfg.variant})")
    for v, why in choice.items():
        if v != variant:
            print(f"  {v}: {why}")

    scalars = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    setup_tracking(params.tracking)
    client = MlflowClient()
    name = params.tracking.registered_model
    champion = current_champion(client, name)
    gates = metric_gates(cfg, m, evaluation["baselines"]["majority"], champion, validation_ok)

    folder = variant_folders(paths).get(variant)
    if folder is None:
        raise UserError(f"{metrics_file}: variant {variant!r} is not one lmforge builds (have {sorted(variant_folders(paths))})")
    with tempfile.TemporaryDirectory(prefix="lmforge-bundle-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        write_bundle(bundle_dir, Path(paths.tokenizer) / TOKENIZER_FILE, Path(folder), Path(paths.lm))
        scored = {
            "artifact_sha256": verify_scored(evaluation, variant, bundle_dir / "classifier", metrics_file),
            "tokenizer_sha256": verify_scored(evaluation, "tokenizer", bundle_dir / TOKENIZER_FILE, metrics_file),
            "test_data_sha256": evaluation["artifacts"].get("labeled_data", {}).get("sha256", ""),
        }
        gates.append(smoke_gate(bundle_dir))
        decision = Decision(variant=variant, gates=gates, choice=choice)
        for g in gates:
            print(g)

        parent = os.environ.get(PARENT_RUN_ENV)
        decision.lineage = {
            "git_commit": git_commit(),
            "params_sha256": hashlib.sha256(Path(params_file).read_bytes()).hexdigest(),
            "ge_success": str(validation_ok),
            "prefect_flow_run_id": flow_run_id or os.environ.get("PREFECT__FLOW_RUN_ID", ""),
            "mlflow_parent_run_id": parent or "",
            **scored,
            **lineage_tags(),
            **dvc_lineage(),
        }
        with mlflow.start_run(run_name="promote", parent_run_id=parent or None, nested=mlflow.active_run() is not None, tags={"lmforge.stage": "promote"}) as run_:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"bundle": str(bundle_dir)},
                code_paths=[str(ROOT / "models")],
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
            mlflow.log_metrics({f"test_{k}": v for k, v in numeric(scalars).items()})
            mlflow.log_dict({"variant": variant, "gates": [g.__dict__ for g in gates], "choice": choice}, "gates.json")
            mlflow.set_tags({f"gate.{g.name}": "pass" if g.passed else "fail" for g in gates})
            decision.lineage["mlflow_promote_run_id"] = run_.info.run_id

    version = str(info.registered_model_version)
    decision.version = version
    tags = {
        "variant": variant,
        "gates": "passed" if decision.passed else "failed",
        **{f"test_{k}": str(v) for k, v in scalars.items()},
        **{f"choice.{v}": why for v, why in choice.items()},
        **{f"gate.{g.name}": f"{'pass' if g.passed else 'fail'}: {g.reason}" for g in gates},
        **{k: str(v) for k, v in decision.lineage.items()},
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k[:250], v[:5000])
    if decision.passed:
        move_champion(client, name, version, f"promoted: every gate passed ({variant})", champion["version"] if champion else None)
        decision.promoted = True
        print(f"promoted {name} v{version} ({variant}) to @{ALIAS}")
    else:
        failed = ", ".join(g.name for g in gates if not g.passed)
        print(f"not promoted: {name} v{version} ({variant}) failed {failed}; @{ALIAS} unchanged")
    return decision


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "tokenizers", "safetensors", "mlflow", "numpy")]
