"""promote: the number-only gates, the data-validation gate on dvc.lock, variant choice and lineage
(no MLflow needed)."""

from __future__ import annotations

import pytest

from tasks.ops.gates import Gate, Rescore, metric_gates, no_regression_gate, perplexity_gate
from tasks.ops.lineage import dvc_lineage
from tasks.ops.promote import choose_variant
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.errors import UserError

CFG = PromoteConfig(
    min_accuracy=0.5,
    min_macro_f1=0.4,
    min_gain_over_majority=0.1,
    max_regression=0.02,
    max_latency_ms=10.0,
    max_size_mb=5.0,
    require_validation=True,
)
GOOD = {"accuracy": 0.8, "macro_f1": 0.75, "p50_ms_b1": 2.5, "size_mb": 1.25}
MAJORITY = {"accuracy": 0.34, "macro_f1": 0.17}


LM = {"test_perplexity": 59.1, "test_tokens": 1000}


def _gates(m=GOOD, majority=MAJORITY, champion=None, cfg=CFG, lm=LM) -> dict:
    return {g.name: g for g in metric_gates(cfg, m, majority, champion, lm)}


def _champion(version="3", macro_f1=0.76, stored=0.77, rows=120, **kw) -> Rescore:
    return Rescore(
        version=version,
        stored_macro_f1=stored,
        macro_f1=macro_f1,
        rows=rows,
        labels=kw.pop("labels", ["db", "net", "ui"]),
        **kw,
    )


def test_all_gates_pass_on_good_numbers():
    gates = _gates()
    assert list(gates) == [
        "min_accuracy",
        "min_macro_f1",
        "beats_majority",
        "no_regression",
        "latency",
        "size",
        "behavioral",
        "lm_perplexity",
    ]
    assert all(g.passed for g in gates.values())
    assert gates["min_accuracy"].reason == "accuracy 0.8000 vs floor 0.5000"
    assert gates["min_macro_f1"].reason == "macro-F1 0.7500 vs floor 0.4000"
    assert gates["beats_majority"].reason == "accuracy gain over majority class +0.4600 vs required +0.1000"
    assert gates["no_regression"].reason == "no current champion"
    assert gates["latency"].reason == "p50 2.50 ms (one text) vs budget 10.00 ms"
    assert gates["size"].reason == "1.25 MB vs budget 5.00 MB"
    assert gates["lm_perplexity"].reason == "test perplexity 59.10 vs ceiling 200.00"
    assert str(gates["size"]).startswith("PASS  size: ")
    assert all(g.status == "pass" and g.configured for g in gates.values())


@pytest.mark.parametrize(
    "gate, change, numbers",
    [
        ("min_accuracy", {"accuracy": 0.45}, ["0.4500", "0.5000"]),
        ("min_macro_f1", {"macro_f1": 0.3}, ["0.3000", "0.4000"]),
        ("latency", {"p50_ms_b1": 12.345}, ["12.35", "10.00"]),
        ("size", {"size_mb": 7.5}, ["7.50", "5.00"]),
    ],
)
def test_each_threshold_gate_fails_with_its_numbers(gate, change, numbers):
    gates = _gates(m={**GOOD, **change})
    assert not gates[gate].passed
    assert all(n in gates[gate].reason for n in numbers), gates[gate].reason
    assert str(gates[gate]).startswith(f"FAIL  {gate}: ")
    assert [g for g in gates.values() if not g.passed] == [gates[gate]]  # nothing else failed


def test_thresholds_are_inclusive():
    edge = {"accuracy": 0.5, "macro_f1": 0.4, "p50_ms_b1": 10.0, "size_mb": 5.0}
    assert all(g.passed for g in _gates(m=edge, majority={"accuracy": 0.375}).values())


def test_gain_exactly_at_the_required_margin_passes():
    """Metrics are rounded to 4 decimals; 0.5 - 0.4 is 0.09999999999999998 in floating point."""
    gate = _gates(m={**GOOD, "accuracy": 0.5}, majority={"accuracy": 0.4})["beats_majority"]
    assert gate.passed, str(gate)


def test_drop_exactly_at_the_allowed_regression_passes():
    """0.77 - 0.75 is 0.020000000000000018 in floating point; a 0.0200 drop is allowed by max_regression 0.02."""
    gate = _gates(champion=_champion(version="1", macro_f1=0.77))["no_regression"]
    assert gate.passed, str(gate)


def test_beats_majority_gate():
    gates = _gates(m={**GOOD, "accuracy": 0.55}, majority={"accuracy": 0.5})
    assert not gates["beats_majority"].passed
    assert "+0.0500" in gates["beats_majority"].reason and "+0.1000" in gates["beats_majority"].reason
    assert _gates(m={**GOOD, "accuracy": 0.65}, majority={"accuracy": 0.5})["beats_majority"].passed


def test_no_regression_compares_the_candidate_with_the_champion_scored_again_on_the_same_rows():
    ok = _gates(champion=_champion(macro_f1=0.76, stored=0.50))["no_regression"]
    assert ok.passed
    assert ok.reason == (
        "macro-F1 0.7500 (candidate, as evaluate scored it) vs 0.7600 "
        "(champion v3 scored again on the same 120 test rows; stored 0.5000); allowed drop 0.0200"
    )
    assert (
        ok.detail["candidate_macro_f1"] == 0.75
        and ok.detail["champion_macro_f1"] == 0.76
        and ok.detail["champion_stored_macro_f1"] == 0.5
    )
    bad = _gates(champion=_champion(macro_f1=0.80, stored=0.70))["no_regression"]
    assert not bad.passed, "the stored score (0.70) would pass; the champion scored again (0.80) must decide"
    assert (
        "0.7500" in bad.reason
        and "v3" in bad.reason
        and "0.8000" in bad.reason
        and "stored 0.7000" in bad.reason
        and "0.0200" in bad.reason
    )


def test_no_regression_without_a_stored_score_still_compares():
    gate = no_regression_gate(CFG, GOOD, _champion(stored=None))
    assert gate.passed and "stored none" in gate.reason


def test_no_regression_fails_in_one_line_when_the_champion_cannot_be_loaded():
    gate = no_regression_gate(
        CFG, GOOD, Rescore(version="3", stored_macro_f1=0.7, error="models:/m/3: no such artifact")
    )
    assert not gate.passed
    assert gate.reason == "champion v3 could not be scored again: models:/m/3: no such artifact"


def test_no_regression_after_a_label_change_compares_on_the_shared_labels():
    champ = _champion(
        macro_f1=0.70, candidate_macro_f1=0.72, rows=80, labels=["db", "net"], added=["ui"], removed=["gui"]
    )
    gate = no_regression_gate(CFG, GOOD, champ)
    assert gate.passed
    assert gate.reason == (
        "label set changed (added: ui; removed: gui); on the 80 test rows of the 2 shared labels "
        "macro-F1 0.7200 (candidate) vs 0.7000 "
        "(champion v3; stored 0.7700); candidate on all its labels 0.7500; allowed drop 0.0200"
    )
    worse = no_regression_gate(
        CFG, GOOD, _champion(macro_f1=0.80, candidate_macro_f1=0.72, labels=["db", "net"], added=["ui"])
    )
    assert not worse.passed and "added: ui; removed: none" in worse.reason


def test_no_regression_with_no_shared_label_is_not_comparable():
    gate = no_regression_gate(
        CFG, GOOD, Rescore(version="3", stored_macro_f1=0.7, labels=[], added=["a", "b"], removed=["x"])
    )
    assert not gate.passed
    assert (
        gate.reason
        == "label set changed (added: a, b; removed: x); not comparable: the candidate and champion v3 share no label"
    )


def test_perplexity_gate():
    assert perplexity_gate(CFG, {"test_perplexity": 250.0}).status == "fail"
    assert perplexity_gate(CFG, {"test_perplexity": 200.0}).passed  # inclusive
    assert perplexity_gate(CFG, {"test_perplexity": float("inf")}).status == "fail"
    masked = perplexity_gate(CFG, {"test_perplexity": None, "note": "masked-LM trunk: no next-token perplexity"})
    assert (
        masked.passed
        and masked.reason == "nothing to check: masked-LM trunk: no next-token perplexity; the service has no /generate"
    )
    assert "no language model was evaluated" in perplexity_gate(CFG, {}).reason


def test_a_switched_off_gate_is_shown_as_not_configured_and_does_not_block():
    off = perplexity_gate(CFG.model_copy(update={"max_perplexity": None}), {"test_perplexity": 1e6})
    assert (off.status, off.passed, off.configured) == ("not configured", True, False)
    assert str(off) == (
        "not configured  lm_perplexity: promote.max_perplexity is null: no ceiling on the language model's perplexity"
    )
    assert off.as_dict()["status"] == "not configured"
    assert str(Gate("size", False, "9 MB")) == "FAIL  size: 9 MB"


VARIANTS = {
    "fp32": {"macro_f1": 0.800, "p50_ms_b1": 4.0, "size_mb": 4.0, "behavioral_min_pass_rate": 0.9},
    "int8": {"macro_f1": 0.795, "p50_ms_b1": 2.0, "size_mb": 1.0, "behavioral_min_pass_rate": 0.9},
    "distilled": {"macro_f1": 0.780, "p50_ms_b1": 1.0, "size_mb": 2.0, "behavioral_min_pass_rate": 0.9},
}
"""int8 is within the default tolerance (0.01) of the best; distilled is faster but 0.02 below."""


def test_auto_picks_the_fastest_variant_within_the_f1_tolerance_and_says_why_the_others_lost():
    chosen, why = choose_variant(CFG, VARIANTS)
    assert chosen == "int8" and why["int8"].startswith("chosen: fastest qualifying variant")
    assert why["fp32"] == "qualified but slower: p50 4.000 ms vs 2.000 ms (int8)"
    assert why["distilled"] == "macro-F1 0.7800 is more than 0.0100 below the best (fp32 0.8000)"


def test_a_wider_tolerance_lets_the_faster_variant_win():
    chosen, why = choose_variant(CFG.model_copy(update={"f1_tolerance": 0.05}), VARIANTS)
    assert chosen == "distilled" and why["int8"].startswith("qualified but slower")


def test_auto_skips_a_variant_over_a_budget_or_failing_behavioral_tests():
    slow = {**VARIANTS, "int8": {**VARIANTS["int8"], "p50_ms_b1": 50.0}}
    chosen, why = choose_variant(CFG, slow)
    assert chosen == "fp32" and why["int8"] == "p50 50.00 ms over the latency budget 10.00 ms"
    big = {**VARIANTS, "int8": {**VARIANTS["int8"], "size_mb": 6.0}}
    assert choose_variant(CFG, big)[0] == "fp32" and "size budget" in choose_variant(CFG, big)[1]["int8"]
    brittle = {**VARIANTS, "int8": {**VARIANTS["int8"], "behavioral_min_pass_rate": 0.3}}
    chosen, why = choose_variant(CFG, brittle)
    assert chosen == "fp32" and why["int8"] == "behavioral tests pass 0.300 of cases, below 0.600"


def test_auto_falls_back_to_the_best_f1_when_none_qualifies():
    over = {k: {**v, "p50_ms_b1": 99.0} for k, v in VARIANTS.items()}
    chosen, why = choose_variant(CFG, over)
    assert chosen == "fp32" and "no variant qualified" in why["fp32"]


def test_auto_breaks_latency_ties_by_higher_f1():
    tie = {**VARIANTS, "fp32": {**VARIANTS["fp32"], "p50_ms_b1": 2.0}}
    assert choose_variant(CFG, tie)[0] == "fp32"


def test_explicit_variant():
    chosen, why = choose_variant(CFG.model_copy(update={"variant": "distilled"}), VARIANTS)
    assert chosen == "distilled" and why["fp32"] == "not chosen: promote.variant names distilled"
    with pytest.raises(UserError, match="promote.variant"):
        choose_variant(CFG.model_copy(update={"variant": "int8"}), {"fp32": VARIANTS["fp32"]})


def test_behavioral_gate_names_the_weakest_test():
    report = {
        "invariance": {"whitespace": {"pass_rate": 0.9}, "rename_identifiers": {"pass_rate": 0.5}},
        "mft": {"pass_rate": 0.8},
    }
    gates = {
        g.name: g
        for g in metric_gates(
            CFG, {**GOOD, "behavioral_min_pass_rate": 0.5, "behavioral": report}, {"accuracy": 0.1}, None, LM
        )
    }
    assert (
        not gates["behavioral"].passed
        and gates["behavioral"].reason == "lowest pass rate 0.500 (rename_identifiers) vs floor 0.600"
    )


LOCK = """\
schema: '2.0'
stages:
  ingest:
    cmd: python -m tasks.ingest
    deps:
    - path: tasks/ingest.py
      hash: md5
      md5: aaa111
      size: 100
    params:
      params.yaml:
        ingest.seed: 1337
    outs:
    - path: data/raw/corpus.parquet
      hash: md5
      md5: bbb222
      size: 200
    - path: data/raw/labeled.parquet
      hash: md5
      md5: ccc333
  tokenize:
    cmd: python -m tasks.tokenize
    deps:
    - path: data/clean/corpus.parquet
      md5: ddd444
    - path: data/tokenizer
      md5: eee555.dir
      nfiles: 1
    outs:
    - path: data/tokens
      cloud: {}
"""


def test_dvc_lineage_reads_every_md5(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(LOCK)
    assert dvc_lineage(lock) == {
        "dvc.ingest.deps.tasks/ingest.py": "aaa111",
        "dvc.ingest.outs.data/raw/corpus.parquet": "bbb222",
        "dvc.ingest.outs.data/raw/labeled.parquet": "ccc333",
        "dvc.tokenize.deps.data/clean/corpus.parquet": "ddd444",
        "dvc.tokenize.deps.data/tokenizer": "eee555.dir",
    }


def test_dvc_lineage_without_lock_or_stages(tmp_path):
    assert dvc_lineage(tmp_path / "dvc.lock") == {}
    (tmp_path / "empty.lock").write_text("")
    assert dvc_lineage(tmp_path / "empty.lock") == {}
    (tmp_path / "nostages.lock").write_text("schema: '2.0'\nstages:\n")
    assert dvc_lineage(tmp_path / "nostages.lock") == {}


def _model(folder, weights: bytes = b"weights") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text('{"kind": "classifier"}')


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"other weights"), "is not what evaluate scored"),
        (lambda d: (d / "model.safetensors").write_bytes(b"weigh"), "is not what evaluate scored"),  # truncated
        (lambda d: (d / "extra.bin").write_bytes(b""), "is not what evaluate scored"),  # a file added
        (lambda d: (d / "config.json").unlink(), "is not what evaluate scored"),  # a file lost
        (lambda d: (d / "config.json").rename(d / "config2.json"), "is not what evaluate scored"),  # renamed
    ],
)
def test_promotion_refuses_an_artifact_that_is_not_what_evaluate_scored(tmp_path, change, message):
    from tasks.ops.promote import verify_scored
    from tasks.shared.digest import tree_sha256

    _model(tmp_path / "m")
    evaluation = {"artifacts": {"fp32": {"path": "m", "sha256": tree_sha256(tmp_path / "m")}}}
    assert (
        verify_scored(evaluation, "fp32", tmp_path / "m", tmp_path / "evaluate.json")
        == evaluation["artifacts"]["fp32"]["sha256"]
    )
    change(tmp_path / "m")
    with pytest.raises(UserError, match=message):
        verify_scored(evaluation, "fp32", tmp_path / "m", tmp_path / "evaluate.json")


@pytest.mark.parametrize(
    "evaluation", [{}, {"artifacts": {}}, {"artifacts": {"int8": {"sha256": "x"}}}, {"artifacts": {"fp32": {}}}]
)
def test_an_evaluation_without_hashes_is_not_evidence(tmp_path, evaluation):
    from tasks.ops.promote import verify_scored

    _model(tmp_path / "m")
    with pytest.raises(UserError, match=r"records no sha256 for 'fp32'.*dvc repro evaluate"):
        verify_scored(evaluation, "fp32", tmp_path / "m", tmp_path / "evaluate.json")


def test_tree_hash_depends_on_names_and_contents_only(tmp_path):
    from tasks.shared.digest import tree_sha256

    _model(tmp_path / "a")
    _model(tmp_path / "b")
    assert tree_sha256(tmp_path / "a") == tree_sha256(tmp_path / "b")
    with pytest.raises(UserError, match="not found"):
        tree_sha256(tmp_path / "missing")


def _validated_project(tmp_path, success: bool = True) -> tuple:
    """Cleaned data, a validation result and a dvc.lock in which validate, tokenize and finetune agree on their md5."""
    import hashlib
    import json

    import yaml
    from conftest import make_paths

    paths = make_paths(tmp_path)
    for f, body in ((paths.clean_labeled, b"labeled rows"), (paths.clean_corpus, b"corpus rows")):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(body)
    result = {
        "success": success,
        "evaluated": 19,
        "failed": [] if success else ["labeled: expect_column_values_to_not_be_null(text): 2 nulls", "corpus: x"],
    }
    paths.validation.parent.mkdir(parents=True, exist_ok=True)
    paths.validation.write_text(json.dumps(result))

    def md5(f) -> str:
        return hashlib.md5(f.read_bytes()).hexdigest()

    def entry(f) -> dict:
        return {"path": str(f.relative_to(tmp_path)), "hash": "md5", "md5": md5(f)}

    labeled, corpus, res = entry(paths.clean_labeled), entry(paths.clean_corpus), entry(paths.validation)
    lock = {
        "schema": "2.0",
        "stages": {
            "clean": {"cmd": "python -m tasks.clean", "outs": [corpus, labeled]},
            "validate": {
                "cmd": "python -m tasks.validate",
                "deps": [corpus, labeled, {"path": "gx", "md5": "e.dir"}],
                "outs": [res],
            },
            "tokenize": {"cmd": "python -m tasks.tokenize", "deps": [dict(corpus), dict(res)]},
            "finetune": {"cmd": "python -m tasks.finetune", "deps": [dict(labeled), dict(res)]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    return paths, lock, md5


def _validation(tmp_path, paths, cfg=CFG):
    from tasks.ops.gates import data_validation_gate

    return data_validation_gate(cfg, paths, tmp_path / "dvc.lock")


def _rewrite(tmp_path, lock) -> None:
    import yaml

    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))


def test_data_validation_passes_on_the_validated_data_version_and_names_its_hashes(tmp_path):
    paths, _, md5 = _validated_project(tmp_path)
    gate = _validation(tmp_path, paths)
    assert gate.passed, str(gate)
    assert md5(paths.clean_labeled)[:12] in gate.reason and md5(paths.clean_corpus)[:12] in gate.reason
    assert "the data version finetune, tokenize consumed" in gate.reason and "19 expectations" in gate.reason
    assert gate.detail["data_md5"][str(paths.clean_labeled)] == md5(paths.clean_labeled)


def test_data_validation_fails_when_training_consumed_another_data_version(tmp_path):
    paths, lock, md5 = _validated_project(tmp_path)
    lock["stages"]["finetune"]["deps"][0]["md5"] = "f" * 32  # finetune trained on data validate never saw
    _rewrite(tmp_path, lock)
    gate = _validation(tmp_path, paths)
    assert not gate.passed
    assert gate.reason == (
        f"{paths.clean_labeled}: validate validated md5 {md5(paths.clean_labeled)[:12]}, "
        "but finetune consumed ffffffffffff (dvc.lock): the candidate's data was not validated"
    )


def test_data_validation_fails_when_the_result_file_is_not_validates_output(tmp_path):
    import json

    paths, _, md5 = _validated_project(tmp_path, success=False)
    recorded = md5(paths.validation)
    paths.validation.write_text(
        json.dumps({"success": True, "evaluated": 1, "failed": []})
    )  # a passing result pasted over a failing one
    gate = _validation(tmp_path, paths)
    assert (
        not gate.passed
        and f"md5 {md5(paths.validation)[:12]} now, {recorded[:12]} in dvc.lock as validate's output" in gate.reason
    )
    paths.validation.unlink()
    assert "missing" in _validation(tmp_path, paths).reason


def test_data_validation_fails_when_a_stage_read_another_result(tmp_path):
    paths, lock, _ = _validated_project(tmp_path)
    lock["stages"]["tokenize"]["deps"][1]["md5"] = "a" * 32
    _rewrite(tmp_path, lock)
    gate = _validation(tmp_path, paths)
    assert not gate.passed and "tokenize read md5 aaaaaaaaaaaa" in gate.reason


def test_data_validation_reports_a_failed_validation_of_the_right_data(tmp_path):
    paths, _, md5 = _validated_project(tmp_path, success=False)
    gate = _validation(tmp_path, paths)
    assert not gate.passed
    assert gate.reason.startswith(f"validation failed on {paths.clean_labeled} md5 {md5(paths.clean_labeled)[:12]}")
    assert "2 of 19 expectations; first: labeled: expect_column_values_to_not_be_null(text): 2 nulls" in gate.reason


@pytest.mark.parametrize("drop", ["validate", "lock"])
def test_data_validation_without_a_validate_record_fails(tmp_path, drop):
    paths, lock, _ = _validated_project(tmp_path)
    if drop == "lock":
        (tmp_path / "dvc.lock").unlink()
    else:
        del lock["stages"]["validate"]
        _rewrite(tmp_path, lock)
    gate = _validation(tmp_path, paths)
    assert not gate.passed and "the data was never validated" in gate.reason


def test_data_validation_switched_off_is_not_configured_but_says_what_it_found(tmp_path):
    paths, _, _ = _validated_project(tmp_path, success=False)
    gate = _validation(tmp_path, paths, CFG.model_copy(update={"require_validation": False}))
    assert (gate.status, gate.passed) == ("not configured", True)
    assert gate.reason.startswith(
        "promote.require_validation is false (the check would say: fail: validation failed on "
    )


@pytest.mark.parametrize("reason", [None, "", "   "])
def test_forced_promotion_needs_a_reason_before_anything_runs(reason):
    from conftest import ROOT

    from tasks.ops.promote import run
    from tasks.shared.config.params import load_params

    with pytest.raises(UserError, match=r'^--force needs --reason "why"'):
        run(load_params(ROOT / "params.yaml"), force=True, reason=reason)
