"""promote: gate the evaluated candidate, register it in MLflow, and move `champion` only if it passes.

Not a DVC stage (it changes the registry, outside the workspace): the Prefect flow calls it after
evaluate, and `lmforge promote` runs it by hand after `dvc repro`. Every candidate becomes a
registered model version tagged with its gate results and lineage, and gets the alias `candidate`;
only a candidate that passes every gate gets `champion` (or one forced with a reason, recorded as an
override). `lmforge rollback` (tasks/ops/rollback.py) moves `champion` back; `lmforge history` prints
every move of both aliases.

Promotion acts only on evidence that describes what it registers: DVC must report every stage up
to date (so metrics/evaluate.json and the dvc.lock lineage belong to the workspace's artifacts), and
the sha256 of the variant, tokenizer and labeled data must equal the hashes evaluate recorded for
what it scored. Otherwise it refuses in one line and registers nothing.

The gates check the things they name: `data_validation` reads the validation result of the data
version (DVC md5) the candidate was trained on; `no_regression` scores the current champion again on
the candidate's test rows with evaluate's code instead of trusting a number stored when it was promoted.
A gate switched off in params.yaml shows as `not configured` (and does not block).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.tokenizer import TOKENIZER_FILE
from tasks.ops.lineage import read_lock
from tasks.ops.lineage import tags as lineage_tags
from tasks.shared.config.base import Paths
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.config.params import Params
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.digest import tree_sha256
from tasks.shared.errors import UserError
from tasks.shared.io import read_json
from tasks.shared.tracking import PARENT_RUN_ENV, git_commit, numeric, setup_tracking
from tasks.shared.validation import read_result
from tasks.shared.variants import folders as variant_folders

ALIAS = "champion"
CANDIDATE = "candidate"
"""Aliases: `champion` is what the service serves; `candidate` is the newest evaluated (registered) version."""
ROOT = Path(__file__).resolve().parents[2]
MODEL_CODE = ROOT / "deploy" / "mlflow_model.py"
PASS, FAIL, NOT_CONFIGURED = "pass", "fail", "not configured"


@dataclass
class Gate:
    """One promotion check: passed or failed and why; a gate switched off in params.yaml is `not configured`
    (kept in the report, never blocking)."""

    name: str
    passed: bool
    reason: str
    configured: bool = True
    detail: dict = field(default_factory=dict)
    """The numbers behind the reason (written to gates.json)."""

    @property
    def status(self) -> str:
        return NOT_CONFIGURED if not self.configured else PASS if self.passed else FAIL

    def as_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "passed": self.passed, "reason": self.reason, **self.detail}

    def __str__(self) -> str:
        return f"{self.status.upper() if self.configured else self.status}  {self.name}: {self.reason}"


def not_configured(name: str, why: str) -> Gate:
    return Gate(name, True, why, configured=False)


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
    `f1_tolerance` of the best, whose batch-1 latency and size fit the budgets and whose behavioral tests
    pass, and takes the fastest of them at batch 1; if none qualifies, the best macro-F1 (its gates then
    say what fails).
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


def metric_gates(
    cfg: PromoteConfig, m: dict, majority: dict, champion: Rescore | None = None, language_model: dict | None = None
) -> list[Gate]:
    """The gates decided by numbers already measured (no I/O): easy to test, printed with their reasons."""
    gates = [
        Gate(
            "min_accuracy",
            m["accuracy"] >= cfg.min_accuracy,
            f"accuracy {m['accuracy']:.4f} vs floor {cfg.min_accuracy:.4f}",
        ),
        Gate(
            "min_macro_f1",
            m["macro_f1"] >= cfg.min_macro_f1,
            f"macro-F1 {m['macro_f1']:.4f} vs floor {cfg.min_macro_f1:.4f}",
        ),
    ]
    gain = round(m["accuracy"] - majority["accuracy"], 6)  # exact-boundary values pass despite float noise
    gates.append(
        Gate(
            "beats_majority",
            gain >= cfg.min_gain_over_majority,
            f"accuracy gain over majority class {gain:+.4f} vs required {cfg.min_gain_over_majority:+.4f}",
        )
    )
    gates.append(no_regression_gate(cfg, m, champion))
    gates.append(
        Gate(
            "latency",
            m["p50_ms_b1"] <= cfg.max_latency_ms,
            f"p50 {m['p50_ms_b1']:.2f} ms (one text) vs budget {cfg.max_latency_ms:.2f} ms",
        )
    )
    gates.append(
        Gate("size", m["size_mb"] <= cfg.max_size_mb, f"{m['size_mb']:.2f} MB vs budget {cfg.max_size_mb:.2f} MB")
    )
    behavior = m.get("behavioral_min_pass_rate")
    if behavior is None:
        gates.append(Gate("behavioral", True, "no behavioral test could run (no applicable cases)"))
    else:
        worst = _worst_behavioral(m.get("behavioral") or {})
        gates.append(
            Gate(
                "behavioral",
                behavior >= cfg.min_behavioral_pass_rate,
                f"lowest pass rate {behavior:.3f}{worst} vs floor {cfg.min_behavioral_pass_rate:.3f}",
            )
        )
    gates.append(perplexity_gate(cfg, language_model))
    return gates


def perplexity_gate(cfg: PromoteConfig, language_model: dict | None) -> Gate:
    """The language model behind /generate: its test perplexity (evaluate's `language_model`) under `max_perplexity`."""
    if cfg.max_perplexity is None:
        return not_configured(
            "lm_perplexity", "promote.max_perplexity is null: no ceiling on the language model's perplexity"
        )
    lm = language_model or {}
    ppl = lm.get("test_perplexity")
    if ppl is None:
        why = lm.get("note") or "no language model was evaluated"
        return Gate(
            "lm_perplexity",
            True,
            f"nothing to check: {why}; the service has no /generate",
            detail={"test_perplexity": None},
        )
    ok = math.isfinite(ppl) and ppl <= cfg.max_perplexity
    return Gate(
        "lm_perplexity",
        ok,
        f"test perplexity {ppl:.2f} vs ceiling {cfg.max_perplexity:.2f}",
        detail={"test_perplexity": ppl},
    )


@dataclass
class Rescore:
    """The current champion scored again on the candidate's test rows with evaluate's code (`rescore_champion`)."""

    version: str
    stored_macro_f1: float | None = None
    """The champion's `test_macro_f1` tag: what evaluate measured when it was registered, on its own test set."""
    macro_f1: float | None = None
    """The champion's macro-F1 on the candidate's test rows (over `labels`)."""
    candidate_macro_f1: float | None = None
    """The candidate's macro-F1 on the same rows and labels; set only when the label sets differ (otherwise
    evaluate's number is the one on the same rows)."""
    rows: int = 0
    labels: list[str] = field(default_factory=list)
    """The labels compared: every label when both models have the same set, else the ones they share."""
    added: list[str] = field(default_factory=list)
    """Labels the candidate has and the champion lacks."""
    removed: list[str] = field(default_factory=list)
    """Labels the champion has and the candidate lacks."""
    error: str | None = None
    """Why the champion could not be scored (then the gate fails with it)."""

    @property
    def same_labels(self) -> bool:
        return not self.added and not self.removed


def no_regression_gate(cfg: PromoteConfig, m: dict, champion: Rescore | None) -> Gate:
    """Macro-F1 may drop at most `max_regression` below the champion's, both scored on the same test rows.

    When the label set changed, both are scored on the test rows of the labels they share (macro-F1 over
    those labels); with no label in common they are not comparable and the gate fails: only a person
    can decide that a new task replaces the old one (`lmforge promote --force --reason`).
    """
    if champion is None:
        return Gate("no_regression", True, "no current champion")
    v = f"champion v{champion.version}"
    stored = f"{champion.stored_macro_f1:.4f}" if champion.stored_macro_f1 is not None else "none"
    detail = {
        "champion_version": champion.version,
        "champion_stored_macro_f1": champion.stored_macro_f1,
        "candidate_macro_f1_evaluate": m["macro_f1"],
    }
    if champion.error:
        return Gate("no_regression", False, f"{v} could not be scored again: {champion.error}", detail=detail)
    added, removed = ", ".join(champion.added) or "none", ", ".join(champion.removed) or "none"
    changed = "" if champion.same_labels else f"label set changed (added: {added}; removed: {removed}); "
    if not champion.labels:
        return Gate(
            "no_regression", False, f"{changed}not comparable: the candidate and {v} share no label", detail=detail
        )
    candidate = m["macro_f1"] if champion.same_labels else champion.candidate_macro_f1
    drop = round(champion.macro_f1 - candidate, 6)
    detail |= {
        "candidate_macro_f1": candidate,
        "champion_macro_f1": champion.macro_f1,
        "rows": champion.rows,
        "labels": champion.labels,
    }
    detail |= {"added_labels": champion.added, "removed_labels": champion.removed}
    if champion.same_labels:
        reason = (
            f"macro-F1 {candidate:.4f} (candidate, as evaluate scored it) vs {champion.macro_f1:.4f} "
            f"({v} scored again on the same {champion.rows} test rows; stored {stored})"
        )
    else:
        reason = (
            f"{changed}on the {champion.rows} test rows of the {len(champion.labels)} shared labels "
            f"macro-F1 {candidate:.4f} (candidate) vs "
            f"{champion.macro_f1:.4f} ({v}; stored {stored}); candidate on all its labels {m['macro_f1']:.4f}"
        )
    return Gate(
        "no_regression", drop <= cfg.max_regression, f"{reason}; allowed drop {cfg.max_regression:.4f}", detail=detail
    )


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


def data_validation_gate(cfg: PromoteConfig, paths: Paths, lock_file: Path = Path("dvc.lock")) -> Gate:
    """Did the validation that passed look at the very data the candidate was trained on? (see `validation_check`)"""
    check = validation_check(paths, lock_file)
    if not cfg.require_validation:
        return not_configured(
            "data_validation",
            f"promote.require_validation is false (the check would say: {check.status}: {check.reason})",
        )
    return check


def validation_check(paths: Paths, lock_file: Path = Path("dvc.lock")) -> Gate:
    """The validation result of the data version (DVC md5) the candidate was trained on, checked through dvc.lock.

    In dvc.lock, the stage that writes `paths.validation` (validate) records the md5 of the cleaned data
    it validated (`paths.clean_labeled`, `paths.clean_corpus`) among its deps; every other stage that
    reads that data (tokenize, finetune, the compression stages, evaluate) records the md5 it consumed.
    They must be equal, the stages that gate on the validation result must have read the one validate
    wrote, and the result file in the workspace must have the md5 dvc.lock records for it. Only then is
    its `success` the verdict on this candidate's data. Never raises: what is wrong is the gate's reason.
    """
    lock_file = Path(lock_file)
    try:
        stages = read_lock(lock_file)
    except UserError as e:
        return Gate("data_validation", False, str(e))
    base = lock_file.resolve().parent

    def key(path) -> Path:
        return (base / path).resolve()

    def records(kind: str, target: Path) -> dict[str, str | None]:
        """stage -> md5 of `target` among that stage's `kind` (deps or outs) in dvc.lock."""
        return {
            st: i.get("md5")
            for st, body in stages.items()
            for i in body.get(kind) or []
            if key(i["path"]) == key(target)
        }

    result_file = Path(paths.validation)
    writers = records("outs", result_file)
    if not writers:
        return Gate(
            "data_validation",
            False,
            f"{lock_file}: no stage records {result_file} as its output: "
            "the data was never validated (run `dvc repro validate`)",
        )
    validator, result_md5 = next(iter(writers.items()))
    hashes, consumers = {}, set()
    for data in (Path(paths.clean_labeled), Path(paths.clean_corpus)):
        used = records("deps", data)
        validated = used.pop(validator, None)
        if validated is None:
            return Gate(
                "data_validation",
                False,
                f"{lock_file}: stage {validator} records no md5 for {data}: it did not validate that data",
            )
        for st, md5 in used.items():
            if md5 != validated:
                why = (
                    f"{data}: {validator} validated md5 {validated[:12]}, but {st} consumed {str(md5)[:12]} "
                    "(dvc.lock): the candidate's data was not validated"
                )
                return Gate("data_validation", False, why, detail={"validated_md5": validated, "consumed_md5": md5})
        if not used:
            return Gate(
                "data_validation",
                False,
                f"{data}: no stage in {lock_file} consumed the md5 {validated[:12]} that {validator} validated",
            )
        hashes[str(data)] = validated
        consumers |= set(used)
    detail = {"data_md5": hashes, "result_md5": result_md5}
    for st, md5 in records("deps", result_file).items():
        if md5 != result_md5:
            return Gate(
                "data_validation",
                False,
                f"{result_file}: {st} read md5 {str(md5)[:12]}, {validator} wrote {str(result_md5)[:12]} (dvc.lock)",
                detail=detail,
            )
    try:
        actual = hashlib.md5(result_file.read_bytes()).hexdigest()
    except OSError:
        return Gate(
            "data_validation",
            False,
            f"{result_file}: missing (dvc.lock records md5 {str(result_md5)[:12]} from {validator}); "
            "run `dvc repro validate`",
            detail=detail,
        )
    if actual != result_md5:
        why = (
            f"{result_file}: md5 {actual[:12]} now, {str(result_md5)[:12]} in dvc.lock as {validator}'s output: "
            "not the result of validating this data"
        )
        return Gate("data_validation", False, why, detail=detail)
    try:
        result = read_result(result_file)
    except UserError as e:
        return Gate("data_validation", False, str(e), detail=detail)
    data = ", ".join(f"{d} md5 {h[:12]}" for d, h in hashes.items())
    if not result["success"]:
        failed = result.get("failed") or []
        first = f"; first: {failed[0]}" if isinstance(failed, list) and failed else ""
        n = len(failed) if isinstance(failed, list) else failed
        return Gate(
            "data_validation",
            False,
            f"validation failed on {data}: {n} of {result.get('evaluated', '?')} expectations{first}",
            detail=detail,
        )
    why = (
        f"Great Expectations suites passed ({result.get('evaluated', '?')} expectations) on {data}: "
        f"the data version {', '.join(sorted(consumers))} consumed"
    )
    return Gate("data_validation", True, why, detail=detail)


def rescore_champion(
    client, name: str, mv, paths: Paths, cfg: EvaluateConfig, candidate_labels: list[str], load_candidate: Callable
) -> Rescore | None:
    """Score the current champion (`mv`, None if there is none) on the candidate's test rows with evaluate's code.

    The test split of `paths.clean_labeled` (the rows evaluate scored the candidate on; `run` checks its
    sha256 first), evaluate's `score_model` and `scores`. If the label sets differ, both models are scored
    on the rows of the shared labels, macro-F1 over those labels (the candidate via `load_candidate`).
    A champion that cannot be loaded or scored comes back with `error` set, never as an exception.
    """
    if mv is None:
        return None
    from deploy.core import ModelUnavailable, load_service_bundle
    from tasks.evaluate import Scorer, score_model, scores
    from tasks.shared.io import read_parquet

    try:
        stored = float(mv.tags["test_macro_f1"])
    except (KeyError, ValueError):
        stored = None
    out = Rescore(version=str(mv.version), stored_macro_f1=stored)
    try:
        champion = load_service_bundle(f"models:/{name}/{mv.version}")
    except ModelUnavailable as e:  # one line naming the URI and what is wrong
        out.error = " ".join(str(e).split())
        return out
    except Exception as e:  # any failure to load it is the gate's finding, not a crash
        out.error = f"models:/{name}/{mv.version}: {_one_line(e)}"
        return out
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    test = data[data["split"] == "test"]
    known = set(champion.labels)
    out.labels = [lab for lab in candidate_labels if lab in known]
    out.added = sorted(set(candidate_labels) - known)
    out.removed = sorted(known - set(candidate_labels))
    if not out.labels:
        return out
    rows = test if out.same_labels else test[test["label"].isin(out.labels)]
    out.rows = len(rows)

    def macro_f1(bundle) -> float:
        _, probs, scorer = score_model(
            lambda: Scorer(bundle.labels, bundle.encode, lambda enc: bundle.forward(*enc).numpy()), rows, cfg
        )
        return scores(rows["label"].tolist(), [scorer.labels[i] for i in probs.argmax(1)], out.labels)["macro_f1"]

    try:
        out.macro_f1 = macro_f1(champion)
    except Exception as e:  # a champion that loads but cannot score these rows fails the gate, too
        out.error = f"scoring it failed: {_one_line(e)}"
        return out
    if not out.same_labels:
        out.candidate_macro_f1 = macro_f1(load_candidate())
    return out


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def override_reason(force: bool, reason: str | None) -> str:
    """`reason` stripped; a forced move of @champion without one is refused (the override must say why)."""
    reason = (reason or "").strip()
    if force and not reason:
        raise UserError('--force needs --reason "why": the override is recorded in the registry')
    return reason


def current_version(client, name: str, alias: str = ALIAS):
    """The model version `alias` points at, or None (no model, no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def current_champion(client, name: str) -> dict | None:
    """{version, macro_f1 (its stored `test_macro_f1`, None if unreadable)} of @champion, or None."""
    mv = current_version(client, name)
    if mv is None:
        return None
    try:
        f1 = float(mv.tags["test_macro_f1"])
    except (KeyError, ValueError):
        f1 = None
    return {"version": str(mv.version), "macro_f1": f1}


HISTORY_TAG = "alias.history."
"""Registered-model tags `alias.history.<ns since epoch>`: one JSON record per move of @champion or @candidate."""
LEGACY_HISTORY_TAG = "champion.history."
"""Where records were kept before @candidate existed (moves of @champion only); still read."""


def move_alias(
    client,
    name: str,
    alias: str,
    version: str,
    reason: str,
    previous: str | None,
    override: bool = False,
    action: str = "promote",
) -> dict:
    """Point `alias` at `version`, recording when, from which version, why, who and whether gates were overridden.

    `action` (promote, rollback, evaluate) lets rollback find the champion before the current one. The
    record is written before the alias moves, so no move (least of all an override) goes unrecorded.
    """
    import getpass
    import time
    from datetime import datetime, timezone

    event = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alias": alias,
        "from": previous,
        "to": str(version),
        "reason": reason,
        "override": override,
        "user": getpass.getuser(),
        "action": action,
    }
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{time.time_ns()}", json.dumps(event))
    if override:
        client.set_model_version_tag(
            name, str(version), "override", f"{event['time']} {event['user']}: {reason}"[:5000]
        )
    client.set_registered_model_alias(name, alias, str(version))
    return event


def move_champion(
    client, name: str, version: str, reason: str, previous: str | None, override: bool = False, action: str = "promote"
) -> dict:
    """`move_alias` for @champion."""
    return move_alias(client, name, ALIAS, version, reason, previous, override, action)


def alias_history(client, name: str, alias: str | None = None) -> list[dict]:
    """Every recorded move of @champion and @candidate (or of `alias` only), oldest first.

    Records written before @candidate existed carry no `alias`: they are moves of @champion."""
    model = client.get_registered_model(name)
    events = []
    for k, v in (model.tags or {}).items():
        for prefix in (HISTORY_TAG, LEGACY_HISTORY_TAG):
            if k.startswith(prefix) and k[len(prefix) :].isdigit():
                events.append((int(k[len(prefix) :]), {"alias": ALIAS, **json.loads(v)}))
    return [ev for _, ev in sorted(events, key=lambda e: e[0]) if alias is None or ev["alias"] == alias]


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
            "the evaluation is not evidence for the current artifacts: "
            f"dvc status reports {len(stale)} stage(s) out of date "
            f"({', '.join(stale)}; {first}: {_describe(stale[first])}); "
            "run `dvc repro` (or `make pipeline`), then promote"
        )


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
    import mlflow
    from deploy.core import load_service_bundle, write_preprocess
    from mlflow import MlflowClient
    from models.bundle import write_bundle

    reason = override_reason(force, reason)
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
    champion_mv = current_version(client, name)

    folder = variant_folders(paths).get(variant)
    if folder is None:
        raise UserError(
            f"{metrics_file}: variant {variant!r} is not one lmforge builds (have {sorted(variant_folders(paths))})"
        )
    with tempfile.TemporaryDirectory(prefix="lmforge-bundle-") as tmp:
        bundle_dir = Path(tmp) / "bundle"
        write_bundle(bundle_dir, Path(paths.tokenizer) / TOKENIZER_FILE, Path(folder), Path(paths.lm))
        write_preprocess(bundle_dir, {"unicode_form": params.clean.unicode_form, "tab_size": params.clean.tab_size})
        scored = {
            "artifact_sha256": verify_scored(evaluation, variant, bundle_dir / "classifier", metrics_file),
            "tokenizer_sha256": verify_scored(evaluation, "tokenizer", bundle_dir / TOKENIZER_FILE, metrics_file),
            "test_data_sha256": verify_scored(evaluation, "labeled_data", Path(paths.clean_labeled), metrics_file),
        }
        if champion_mv is not None:
            print(f"scoring champion v{champion_mv.version} again on the candidate's test rows")
        labels = list(m.get("per_class_f1") or load_service_bundle(str(bundle_dir)).labels)
        champion = rescore_champion(
            client, name, champion_mv, paths, params.evaluate, labels, lambda: load_service_bundle(str(bundle_dir))
        )
        gates = [
            data_validation_gate(cfg, paths),
            *metric_gates(cfg, m, evaluation["baselines"]["majority"], champion, evaluation.get("language_model")),
            smoke_gate(bundle_dir),
        ]
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
        with mlflow.start_run(
            run_name="promote",
            parent_run_id=parent or None,
            nested=mlflow.active_run() is not None,
            tags={"lmforge.stage": "promote"},
        ) as run_:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"bundle": str(bundle_dir)},
                code_paths=[str(ROOT / "models")],
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
            mlflow.log_metrics({f"test_{k}": v for k, v in numeric(scalars).items()})
            mlflow.log_dict(
                {
                    "variant": variant,
                    "gates": [g.as_dict() for g in gates],
                    "choice": choice,
                    "force": force,
                    "reason": reason,
                },
                "gates.json",
            )
            mlflow.set_tags({f"gate.{g.name}": g.status for g in gates})
            decision.lineage["mlflow_promote_run_id"] = run_.info.run_id

    version = str(info.registered_model_version)
    decision.version = version
    verdict = "passed" if decision.passed else "failed"
    tags = {
        "variant": variant,
        "gates": verdict,
        **{f"test_{k}": str(v) for k, v in scalars.items()},
        **{f"choice.{v}": why for v, why in choice.items()},
        **{f"gate.{g.name}": f"{g.status}: {g.reason}" for g in gates},
        **{k: str(v) for k, v in decision.lineage.items()},
    }
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k[:250], v[:5000])
    previous = str(champion_mv.version) if champion_mv is not None else None
    failed = ", ".join(decision.failed)
    last = current_version(client, name, CANDIDATE)
    evaluated = f"evaluated: gates {verdict}" + (f" ({failed})" if failed else "") + f"; {variant}"
    move_alias(client, name, CANDIDATE, version, evaluated, str(last.version) if last else None, action="evaluate")
    if decision.passed:
        move_champion(
            client,
            name,
            version,
            f"promoted: every gate passed ({variant})" + (f"; {reason}" if reason else ""),
            previous,
        )
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
    return decision


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "tokenizers", "safetensors", "mlflow", "numpy")]
