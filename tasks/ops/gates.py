"""The promotion gates: each checks one thing about the candidate and says pass or fail, and why.

The gates check the things they name: `data_validation` reads the validation result of the data
version (DVC md5) the candidate was trained on; `no_regression` scores the current champion again on
the candidate's test rows with the shared scoring code (tasks/shared/scoring.py) instead of trusting a
number stored when it was promoted, and compares the two on the same rows with paired tests;
`beats_baselines` compares the candidate with every trained baseline the same way (evaluate's
`vs_baselines`); `smoke_test` loads the candidate with the servers' inference core (deploy/) and answers
their example requests. A gate switched off in params.yaml shows as `not configured` (and does not block).

Noise is part of every verdict: a difference counts only when a paired test on the same test rows says it
is significant (tasks/shared/stats.py), Holm-corrected over the tests a gate decides on, and the reason
prints both scores, the difference's 95% interval and the p-values.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.ops.dag import read_lock
from tasks.ops.registry import stored_macro_f1
from tasks.shared.config.base import Paths
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.errors import UserError
from tasks.shared.stats import Paired, Resamples, holm, paired
from tasks.shared.validation import read_result

if TYPE_CHECKING:
    import pandas as pd

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


def metric_gates(
    cfg: PromoteConfig,
    m: dict,
    majority: dict,
    champion: list[Gate] | None = None,
    language_model: dict | None = None,
) -> list[Gate]:
    """The gates decided by numbers already measured (no I/O): easy to test, printed with their reasons.
    `champion`: the gates against the current champion (`champion_gates`), placed after the baselines'."""
    gates = [
        Gate(
            "min_accuracy",
            m["accuracy"] >= cfg.min_accuracy,
            f"accuracy {m['accuracy']:.4f}{_ci(m, 'accuracy')} vs floor {cfg.min_accuracy:.4f}",
        ),
        Gate(
            "min_macro_f1",
            m["macro_f1"] >= cfg.min_macro_f1,
            f"macro-F1 {m['macro_f1']:.4f}{_ci(m, 'macro_f1')} vs floor {cfg.min_macro_f1:.4f}",
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
    gates.append(beats_baselines_gate(cfg, m))
    gates += champion or [
        Gate("no_regression", True, "no current champion"),
        churn_gate(cfg, None, "no current champion"),
    ]
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


def _ci(m: dict, key: str) -> str:
    ci = m.get(f"{key}_ci95")
    return f" [95% CI {ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def baseline_verdict(cfg: PromoteConfig, versus: dict[str, dict]) -> tuple[bool, str, dict]:
    """(passes `promote.baselines`, why, the numbers) for a variant's paired comparisons with the trained baselines
    (evaluate's `vs_baselines`). The p-values are Holm-corrected over the family the mode decides on: `not_worse`
    and `report` test "worse" on macro-F1 (paired bootstrap) and accuracy (exact McNemar) against every baseline;
    `better` tests "better" on macro-F1 against every baseline."""
    pairs = {b: Paired.from_dict(c) for b, c in versus.items()}
    strongest = max(pairs, key=lambda b: (pairs[b].macro_f1[1], pairs[b].accuracy[1]))
    if cfg.baselines == "better":
        adjusted = holm({b: p.p_f1_better for b, p in pairs.items()})
        failing = [b for b in pairs if adjusted[b] >= cfg.alpha]
        verdict = (
            f"not significantly better than {', '.join(failing)}" if failing else "significantly better than every one"
        )
        key = min(failing, key=lambda b: pairs[b].macro_f1_diff) if failing else strongest
        p_line = f"p(better) {pairs[key].p_f1_better:.3g}, Holm-adjusted {adjusted[key]:.3g} over {len(pairs)} tests"
    else:
        raw = {f"{b}/macro_f1": p.p_f1_worse for b, p in pairs.items()}
        raw |= {f"{b}/accuracy": p.mcnemar["p_a_worse"] for b, p in pairs.items()}
        adjusted = holm(raw)
        failing = [b for b in pairs if min(adjusted[f"{b}/macro_f1"], adjusted[f"{b}/accuracy"]) < cfg.alpha]
        verdict = f"significantly worse than {', '.join(failing)}" if failing else "not significantly worse than any"
        key = min(failing, key=lambda b: pairs[b].p_worse) if failing else strongest
        p_line = (
            f"Holm-adjusted p(worse) macro-F1 {adjusted[f'{key}/macro_f1']:.3g}, "
            f"accuracy {adjusted[f'{key}/accuracy']:.3g} over {len(raw)} tests"
        )
    named = "strongest baseline" if key == strongest else "baseline"
    verdict = f"{verdict} of {len(pairs)} trained baselines"
    why = (
        f"{verdict} (promote.baselines: {cfg.baselines}, α {cfg.alpha}); "
        f"{named} {key}: {pairs[key].describe('candidate', key)}; {p_line}"
    )
    detail = {"verdict": verdict, "strongest_baseline": strongest, "failing": failing, "adjusted_p": adjusted}
    detail["vs_baselines"] = versus
    return not failing, why, detail


def beats_baselines_gate(cfg: PromoteConfig, m: dict) -> Gate:
    """The candidate against every trained baseline on the same test rows (evaluate's `vs_baselines`), as
    `promote.baselines` asks; `report` shows the comparison without blocking."""
    versus = m.get("vs_baselines")
    if versus is None:
        return Gate(
            "beats_baselines",
            False,
            "metrics/evaluate.json has no paired comparison with the baselines (an older lmforge wrote it): "
            "run `dvc repro evaluate`",
        )
    if not versus:
        return Gate("beats_baselines", True, "no trained baseline was evaluated")
    passed, why, detail = baseline_verdict(cfg, versus)
    report_only = cfg.baselines == "report"  # shown, never blocking
    return Gate("beats_baselines", passed or report_only, why, configured=not report_only, detail=detail)


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
    """The current champion's predictions on the candidate's test rows, by evaluate's code (`rescore_champion`)."""

    version: str
    stored_macro_f1: float | None = None
    """The champion's `test_macro_f1` tag: what evaluate measured when it was registered, on its own test set."""
    predictions: dict[str, str] = field(default_factory=dict)
    """Row id -> the champion's label, for the candidate's test rows of the compared `labels`."""
    labels: list[str] = field(default_factory=list)
    """The labels compared: every label when both models have the same set, else the ones they share."""
    added: list[str] = field(default_factory=list)
    """Labels the candidate has and the champion lacks."""
    removed: list[str] = field(default_factory=list)
    """Labels the champion has and the candidate lacks."""
    trained_on: list[str] | None = None
    """Source files of the champion's train and validation rows (its `split.json`); None: not recorded."""
    error: str | None = None
    """Why the champion could not be scored (then the gate fails with it)."""

    @property
    def same_labels(self) -> bool:
        return not self.added and not self.removed


def champion_gates(cfg: PromoteConfig, test: pd.DataFrame, champion: Rescore | None, resamples: int, seed: int):
    """`no_regression` and `churn`: the candidate's test predictions (`test`: id, source, label, pred) against the
    current champion's on the same rows.

    no_regression fails only on a drop larger than `max_regression` that is significant (Holm over two one-sided
    tests at `alpha`: macro-F1 by paired bootstrap, accuracy by exact McNemar). When the label set changed, both are
    compared on the rows of the shared labels (macro-F1 over them); with no label in common they are not comparable.
    When the champion trained on files that are now test files, its score there is flattered: both are compared on
    the rows held out for both, and below `min_comparable_rows` such rows they are not comparable. Only a person can
    move @champion past "not comparable" (`lmforge promote --force --reason`).
    """
    if champion is None:
        return [Gate("no_regression", True, "no current champion"), churn_gate(cfg, None, "no current champion")]
    v = f"champion v{champion.version}"
    stored = f"{champion.stored_macro_f1:.4f}" if champion.stored_macro_f1 is not None else "none"
    detail = {"champion_version": champion.version, "champion_stored_macro_f1": champion.stored_macro_f1}
    if champion.error:
        why = f"{v} could not be scored again: {champion.error}"
        return [Gate("no_regression", False, why, detail=detail), churn_gate(cfg, None, why)]
    added, removed = ", ".join(champion.added) or "none", ", ".join(champion.removed) or "none"
    notes = [] if champion.same_labels else [f"label set changed (added: {added}; removed: {removed})"]
    if not champion.labels:
        why = "; ".join([*notes, f"not comparable: the candidate and {v} share no label"])
        return [Gate("no_regression", False, why, detail=detail), churn_gate(cfg, None, why)]
    rows = test[test["id"].isin(champion.predictions)]
    theirs = rows["id"].map(champion.predictions)
    churn = churn_gate(cfg, float(np.mean(rows["pred"].to_numpy() != theirs.to_numpy())), f"{len(rows)} test rows", v)
    if not champion.same_labels:
        notes.append(f"compared on the {len(rows)} test rows of the {len(champion.labels)} shared labels")
    held, split_note = held_out_for_both(rows, champion.trained_on, v)
    notes += [split_note] if split_note else []
    detail |= {"rows": len(held), "labels": champion.labels, "added_labels": champion.added}
    detail |= {"removed_labels": champion.removed, "trained_on_test_files": len(rows) - len(held)}
    if len(held) < (cfg.min_comparable_rows if len(held) < len(rows) else 1):
        why = f"not comparable: {len(held)} test rows held out for both, fewer than {cfg.min_comparable_rows}"
        return [Gate("no_regression", False, "; ".join([*notes, why]), detail=detail), churn]
    pr = paired(
        held["label"],
        held["pred"],
        held["id"].map(champion.predictions),
        champion.labels,
        Resamples(len(held), resamples, seed),
    )
    p = holm({"macro_f1": pr.p_f1_worse, "accuracy": pr.mcnemar["p_a_worse"]})
    drops = {"macro_f1": round(-pr.macro_f1_diff, 6), "accuracy": round(-pr.accuracy_diff, 6)}
    regressed = [k for k in drops if drops[k] > cfg.max_regression and p[k] < cfg.alpha]
    verdict = (
        f"significant drop larger than {cfg.max_regression:.4f} in {' and '.join(regressed)}"
        if regressed
        else f"no significant drop larger than {cfg.max_regression:.4f}"
    )
    reason = "; ".join(
        [
            *notes,
            pr.describe("candidate", f"{v}, scored again; stored {stored}"),
            f"Holm-adjusted p(worse): macro-F1 {p['macro_f1']:.3g}, accuracy {p['accuracy']:.3g}",
            f"{verdict} (α {cfg.alpha})",
        ]
    )
    detail |= pr.as_dict() | {"adjusted_p": p, "regressed": regressed}
    return [Gate("no_regression", not regressed, reason, detail=detail), churn]


def held_out_for_both(rows: pd.DataFrame, trained_on: list[str] | None, v: str) -> tuple[pd.DataFrame, str]:
    """The test rows from files the champion did not train or validate on, and a note when that is not all of them."""
    if trained_on is None:
        return rows, f"{v} records no split (registered by an older lmforge): its training files were not checked"
    seen = sorted(set(rows["source"]) & set(trained_on))
    if not seen:
        return rows, ""
    held = rows[~rows["source"].isin(seen)]
    return held, (
        f"{v} was trained on {len(seen)} files that are now test files (first: {seen[0]}): "
        f"compared on the {len(held)} of {len(rows)} test rows held out for both"
    )


def churn_gate(cfg: PromoteConfig, churn: float | None, where: str, v: str = "the champion") -> Gate:
    """Share of test rows whose predicted label changes against the champion, under `max_churn` if one is set."""
    if churn is None:
        return Gate("churn", True, f"not measured: {where}", configured=cfg.max_churn is not None)
    said = f"{churn:.4f} of the {where} change label against {v}"
    detail = {"churn": round(churn, 4)}
    if cfg.max_churn is None:
        return Gate("churn", True, f"{said}; promote.max_churn is null: report only", configured=False, detail=detail)
    return Gate("churn", churn <= cfg.max_churn, f"{said} vs ceiling {cfg.max_churn:.4f}", detail=detail)


def _worst_behavioral(report: dict) -> str:
    """` (<test>)` naming the behavioral test with the lowest pass rate."""
    rates = {name: r.get("pass_rate") for name, r in (report.get("invariance") or {}).items()}
    rates["minimum_functionality"] = (report.get("mft") or {}).get("pass_rate")
    rates = {k: v for k, v in rates.items() if v is not None}
    return f" ({min(rates, key=rates.get)})" if rates else ""


SMOKE_GENERATION = {"max_new_tokens": 8, "temperature": 0.8, "top_p": 0.9, "stop": ("\n\n",), "seed": 0}
"""The smoke test's /generate request beside the service's example prompt: sampled, nucleus, a stop string."""


def smoke_gate(bundle_dir: Path) -> Gate:
    """Load the candidate with the servers' inference core (its preprocess.json normalization included)
    and answer the service's example requests: classify its example texts, and continue its example
    prompt with sampling, top-p and a stop string when the model can generate."""
    from deploy.core import classify, generate
    from deploy.requests import EXAMPLE_INPUT, EXAMPLE_PROMPT, GenerationRequest
    from deploy.resolve import open_model

    try:
        model = open_model(str(bundle_dir), to_store=False)
        labels = set(model.bundle.labels)
        preds = classify(model, list(EXAMPLE_INPUT))
        ok = len(preds) == len(EXAMPLE_INPUT) and all(
            p["label"] in labels and abs(sum(p["probabilities"].values()) - 1) < 1e-3 for p in preds
        )
        request = GenerationRequest(EXAMPLE_PROMPT, **SMOKE_GENERATION)
        generated = generate(model, request) if model.bundle.can_generate else None
    except Exception as e:  # any failure to load or answer is the gate's finding, not a crash
        return Gate("smoke_test", False, f"the inference core failed on the candidate: {type(e).__name__}: {e}")
    if not ok:
        return Gate("smoke_test", False, "the inference core returned malformed predictions")
    said = (
        f"generated {generated.tokens} tokens ({generated.finish_reason})"
        if generated is not None
        else "no /generate (masked-LM trunk)"
    )
    return Gate("smoke_test", True, f"the inference core loaded it, classified {len(preds)} texts, {said}")


def data_validation_gate(cfg: PromoteConfig, paths: Paths, lock_file: Path = Path("dvc.lock")) -> Gate:
    """Did the validation that passed look at the very data the candidate was trained on? (see `validation_check`)"""
    check = validation_check(paths, lock_file)
    if not cfg.require_validation:
        return not_configured(
            "data_validation",
            f"promote.require_validation is false (the check would say: {check.status}: {check.reason})",
        )
    return check


class _NotValidated(Exception):
    """Why the data_validation gate fails: its reason, and the numbers behind it."""

    def __init__(self, reason: str, detail: dict | None = None) -> None:
        super().__init__(reason)
        self.detail = detail or {}


@dataclass
class _Lock:
    """dvc.lock's stages, with paths compared as the files they name."""

    file: Path
    stages: dict

    @classmethod
    def read(cls, lock_file: Path) -> "_Lock":
        try:
            return cls(lock_file, read_lock(lock_file))
        except UserError as e:
            raise _NotValidated(str(e)) from None

    def records(self, kind: str, target: Path) -> dict[str, str | None]:
        """stage -> md5 of `target` among that stage's `kind` (deps or outs)."""
        base = self.file.resolve().parent
        want = (base / target).resolve()
        return {
            st: i.get("md5")
            for st, body in self.stages.items()
            for i in body.get(kind) or []
            if (base / i["path"]).resolve() == want
        }


def validation_check(paths: Paths, lock_file: Path = Path("dvc.lock")) -> Gate:
    """The validation result of the data version (DVC md5) the candidate was trained on, checked through dvc.lock.

    In dvc.lock, the stage that writes `paths.validation` (validate) records the md5 of the cleaned data
    it validated (`paths.clean_labeled`, `paths.clean_corpus`) among its deps; every other stage that
    reads that data (tokenize, finetune, the compression stages, evaluate) records the md5 it consumed.
    They must be equal, the stages that gate on the validation result must have read the one validate
    wrote, and the result file in the workspace must have the md5 dvc.lock records for it. Only then is
    its `success` the verdict on this candidate's data. Never raises: what is wrong is the gate's reason.
    """
    result_file = Path(paths.validation)
    try:
        lock = _Lock.read(Path(lock_file))
        validator, result_md5 = _validator(lock, result_file)
        hashes, consumers = _validated_data(lock, validator, [Path(paths.clean_labeled), Path(paths.clean_corpus)])
        detail = {"data_md5": hashes, "result_md5": result_md5}
        result = _current_result(lock, result_file, validator, result_md5, detail)
    except _NotValidated as e:
        return Gate("data_validation", False, str(e), detail=e.detail)
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


def _validator(lock: _Lock, result_file: Path) -> tuple[str, str | None]:
    """(the stage that wrote the validation result, the result's md5) per dvc.lock."""
    writers = lock.records("outs", result_file)
    if not writers:
        raise _NotValidated(
            f"{lock.file}: no stage records {result_file} as its output: "
            "the data was never validated (run `dvc repro validate`)"
        )
    return next(iter(writers.items()))


def _validated_data(lock: _Lock, validator: str, datasets: list[Path]) -> tuple[dict[str, str], set[str]]:
    """({data: the md5 validated}, the stages that consumed it), if every consumer read what was validated."""
    hashes, consumers = {}, set()
    for data in datasets:
        used = lock.records("deps", data)
        validated = used.pop(validator, None)
        if validated is None:
            raise _NotValidated(
                f"{lock.file}: stage {validator} records no md5 for {data}: it did not validate that data"
            )
        for st, md5 in used.items():
            if md5 != validated:
                why = (
                    f"{data}: {validator} validated md5 {validated[:12]}, but {st} consumed {str(md5)[:12]} "
                    "(dvc.lock): the candidate's data was not validated"
                )
                raise _NotValidated(why, {"validated_md5": validated, "consumed_md5": md5})
        if not used:
            raise _NotValidated(
                f"{data}: no stage in {lock.file} consumed the md5 {validated[:12]} that {validator} validated"
            )
        hashes[str(data)] = validated
        consumers |= set(used)
    return hashes, consumers


def _current_result(lock: _Lock, result_file: Path, validator: str, result_md5: str | None, detail: dict) -> dict:
    """The validation result in the workspace, if it is the one validator wrote and every reader read."""
    for st, md5 in lock.records("deps", result_file).items():
        if md5 != result_md5:
            why = f"{result_file}: {st} read md5 {str(md5)[:12]}, {validator} wrote {str(result_md5)[:12]} (dvc.lock)"
            raise _NotValidated(why, detail)
    try:
        actual = hashlib.md5(result_file.read_bytes()).hexdigest()
    except OSError:
        raise _NotValidated(
            f"{result_file}: missing (dvc.lock records md5 {str(result_md5)[:12]} from {validator}); "
            "run `dvc repro validate`",
            detail,
        ) from None
    if actual != result_md5:
        why = (
            f"{result_file}: md5 {actual[:12]} now, {str(result_md5)[:12]} in dvc.lock as {validator}'s output: "
            "not the result of validating this data"
        )
        raise _NotValidated(why, detail)
    try:
        return read_result(result_file)
    except UserError as e:
        raise _NotValidated(str(e), detail) from None


def rescore_champion(client, name: str, mv, paths: Paths, cfg: EvaluateConfig, candidate_labels: list[str]):
    """The champion's (`mv`, None if there is none) predictions on the candidate's test rows, by evaluate's code.

    The test split of `paths.clean_labeled` (the rows evaluate scored the candidate on; `run` checks its sha256
    first), scored with the `score_model` that evaluate uses; if the label sets differ, on the rows of the shared
    labels. Also what the champion trained on (`trained_on`), from the split its promotion recorded.
    A champion that cannot be loaded or scored comes back with `error` set, never as an exception.
    """
    if mv is None:
        return None
    from deploy.resolve import ModelUnavailable, load_service_bundle
    from tasks.shared.io import read_parquet
    from tasks.shared.scoring import Scorer, score_model

    out = Rescore(version=str(mv.version), stored_macro_f1=stored_macro_f1(mv), trained_on=trained_sources(mv))
    try:
        champion = load_service_bundle(f"models:/{name}/{mv.version}")
    except ModelUnavailable as e:  # one line naming the URI and what is wrong
        out.error = " ".join(str(e).split())
        return out
    except Exception as e:  # any failure to load it is the gate's finding, not a crash
        out.error = f"models:/{name}/{mv.version}: {_one_line(e)}"
        return out
    data = read_parquet(paths.clean_labeled, ["id", "text", "label", "split"])
    test = data[data["split"] == "test"]
    known = set(champion.labels)
    out.labels = [lab for lab in candidate_labels if lab in known]
    out.added = sorted(set(candidate_labels) - known)
    out.removed = sorted(known - set(candidate_labels))
    if not out.labels:
        return out
    rows = test if out.same_labels else test[test["label"].isin(out.labels)]
    scorer = Scorer(champion.labels, champion.encode, lambda enc: champion.forward(*enc).numpy())
    try:
        _, probs, _ = score_model(lambda: scorer, rows, cfg)
    except Exception as e:  # a champion that loads but cannot score these rows fails the gate, too
        out.error = f"scoring it failed: {_one_line(e)}"
        return out
    out.predictions = dict(zip(rows["id"], (champion.labels[i] for i in probs.argmax(1))))
    return out


SPLIT_ARTIFACT = "split.json"
"""In a version's promote run: which source files held its train, validation and test rows, and a digest of the
test rows' ids (tasks/ops/promote.py `split_record`)."""


def trained_sources(mv) -> list[str] | None:
    """Source files of a registered version's train and validation rows, None when its run recorded no split."""
    from mlflow.exceptions import MlflowException

    import mlflow

    try:
        split = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{SPLIT_ARTIFACT}")
    except (MlflowException, OSError, ValueError):  # an older version's run has no such file: not recorded
        return None
    return sorted(set(split.get("sources", {}).get("train", [])) | set(split.get("sources", {}).get("val", [])))


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"
