"""promote: the number-only gates, the data-validation gate on dvc.lock, variant choice and lineage
(no MLflow needed)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.ops.gates import Gate, Rescore, beats_baselines_gate, champion_gates, metric_gates, perplexity_gate
from tasks.ops.lineage import lock_record
from tasks.ops.promote import choose_variant
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.errors import UserError
from tasks.shared.stats import Resamples, paired

CFG = PromoteConfig(
    min_accuracy=0.5,
    min_macro_f1=0.4,
    min_gain_over_majority=0.1,
    max_regression=0.02,
    max_latency_ms=10.0,
    max_size_mb=5.0,
    require_validation=True,
)
GOOD = {"accuracy": 0.8, "macro_f1": 0.75, "p50_ms_b1": 2.5, "size_mb": 1.25, "vs_baselines": {}}
MAJORITY = {"accuracy": 0.34, "macro_f1": 0.17}


LM = {"test_perplexity": 59.1, "test_tokens": 1000}


def _gates(m=GOOD, majority=MAJORITY, champion=None, cfg=CFG, lm=LM) -> dict:
    return {g.name: g for g in metric_gates(cfg, m, majority, champion, lm)}


LABELS3 = ["db", "net", "ui"]


def _rows(n: int, candidate_right: float, champion_right: float, seed: int = 0, sources: int = 10):
    """`n` test rows (id, source, label, pred) and a champion's predictions of them: each model right on exactly
    round(share * n) rows, chosen by a seeded permutation each, and wrong rows labelled with the next label."""
    rng = np.random.default_rng(seed)
    label = [LABELS3[i % 3] for i in range(n)]
    wrong = {a: b for a, b in zip(LABELS3, LABELS3[1:] + LABELS3[:1])}

    def predict(share: float) -> list[str]:
        right = set(rng.permutation(n)[: round(share * n)].tolist())
        return [y if i in right else wrong[y] for i, y in enumerate(label)]

    ids = [f"f{i % sources}.py#{i}" for i in range(n)]
    test = pd.DataFrame(
        {
            "id": ids,
            "source": [f"f{i % sources}.py" for i in range(n)],
            "label": label,
            "pred": predict(candidate_right),
        }
    )
    return test, dict(zip(ids, predict(champion_right)))


def _champion(predictions: dict, version="3", stored=0.77, **kw) -> Rescore:
    return Rescore(
        version=version,
        stored_macro_f1=stored,
        predictions=predictions,
        labels=kw.pop("labels", LABELS3),
        trained_on=kw.pop("trained_on", []),
        **kw,
    )


def _vs_champion(test, champion, cfg=CFG) -> dict:
    return {g.name: g for g in champion_gates(cfg, test, champion, 1000, 1337)}


def _versus(n: int = 600, candidate_right: float = 0.8, baselines: dict | None = None) -> dict:
    """evaluate's `vs_baselines`: a candidate right on `candidate_right` of `n` rows, baselines right on theirs."""
    test, _ = _rows(n, candidate_right, 0.0)
    out = {}
    for k, (name, right) in enumerate((baselines or {"cnn": 0.8, "tfidf_logreg": 0.78}).items()):
        _, theirs = _rows(n, right, right, seed=k + 1)
        out[name] = paired(test["label"], test["pred"], list(theirs.values()), LABELS3, Resamples(n)).as_dict()
    return out


def test_all_gates_pass_on_good_numbers():
    gates = _gates()
    assert list(gates) == [
        "min_accuracy",
        "min_macro_f1",
        "beats_majority",
        "beats_baselines",
        "no_regression",
        "churn",
        "latency",
        "size",
        "behavioral",
        "lm_perplexity",
    ]
    assert all(g.passed for g in gates.values())
    assert gates["beats_baselines"].reason == "no trained baseline was evaluated"
    assert gates["churn"].reason == "not measured: no current champion"
    assert gates["min_accuracy"].reason == "accuracy 0.8000 vs floor 0.5000"
    assert gates["min_macro_f1"].reason == "macro-F1 0.7500 vs floor 0.4000"
    assert gates["beats_majority"].reason == "accuracy gain over majority class +0.4600 vs required +0.1000"
    assert gates["no_regression"].reason == "no current champion"
    assert gates["latency"].reason == "p50 2.50 ms (one text) vs budget 10.00 ms"
    assert gates["size"].reason == "1.25 MB vs budget 5.00 MB"
    assert gates["lm_perplexity"].reason == "test perplexity 59.10 vs ceiling 200.00"
    assert str(gates["size"]).startswith("PASS  size: ")
    assert all(g.status == "pass" and g.configured for n, g in gates.items() if n != "churn")


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
    edge = {"accuracy": 0.5, "macro_f1": 0.4, "p50_ms_b1": 10.0, "size_mb": 5.0, "vs_baselines": {}}
    assert all(g.passed for g in _gates(m=edge, majority={"accuracy": 0.375}).values())


def test_gain_exactly_at_the_required_margin_passes():
    """Metrics are rounded to 4 decimals; 0.5 - 0.4 is 0.09999999999999998 in floating point."""
    gate = _gates(m={**GOOD, "accuracy": 0.5}, majority={"accuracy": 0.4})["beats_majority"]
    assert gate.passed, str(gate)


def test_beats_majority_gate():
    gates = _gates(m={**GOOD, "accuracy": 0.55}, majority={"accuracy": 0.5})
    assert not gates["beats_majority"].passed
    assert "+0.0500" in gates["beats_majority"].reason and "+0.1000" in gates["beats_majority"].reason
    assert _gates(m={**GOOD, "accuracy": 0.65}, majority={"accuracy": 0.5})["beats_majority"].passed


def test_no_regression_compares_both_on_the_same_rows_with_intervals_and_p_values():
    test, champ = _rows(400, 0.80, 0.81)
    gates = _vs_champion(test, _champion(champ, stored=0.5))
    assert gates["no_regression"].detail["accuracy_diff"] == -0.01
    ok = gates["no_regression"]
    assert ok.passed and ok.detail["rows"] == 400 and ok.detail["champion_stored_macro_f1"] == 0.5
    assert "(candidate) vs " in ok.reason and "(champion v3, scored again; stored 0.5000)" in ok.reason
    assert "[95% CI " in ok.reason and "p(worse)" in ok.reason and "exact McNemar" in ok.reason
    assert "Holm-adjusted p(worse): macro-F1 " in ok.reason and "no significant drop larger than 0.0200" in ok.reason
    lo, hi = ok.detail["macro_f1_diff_ci95"]
    assert lo <= ok.detail["macro_f1_diff"] <= hi
    churn = gates["churn"]
    assert churn.status == "not configured" and churn.detail["churn"] > 0.1 and "report only" in churn.reason


def test_a_significant_drop_beyond_the_margin_fails_and_says_why():
    test, champ = _rows(400, 0.55, 0.90)
    bad = _vs_champion(test, _champion(champ))["no_regression"]
    assert not bad.passed and bad.detail["regressed"] == ["macro_f1", "accuracy"]
    assert bad.detail["adjusted_p"]["macro_f1"] < 0.001 and bad.detail["adjusted_p"]["accuracy"] < 0.001
    assert "significant drop larger than 0.0200 in macro_f1 and accuracy (α 0.05)" in bad.reason


def test_a_drop_within_noise_passes_however_large_it_looks():
    """20 rows: a 10-point drop is within the noise of so few rows."""
    test, champ = _rows(20, 0.75, 0.85)
    gate = _vs_champion(test, _champion(champ))["no_regression"]
    assert gate.detail["accuracy_diff"] == -0.1, gate.reason
    assert gate.passed, gate.reason


def test_a_significant_drop_within_the_margin_passes():
    test, champ = _rows(4000, 0.80, 0.81)
    for k, i in enumerate(test["id"][:800]):  # the champion right wherever the candidate is, on 800 rows
        champ[i] = test["label"][k]
    gate = _vs_champion(test, _champion(champ), CFG.model_copy(update={"max_regression": 0.2}))["no_regression"]
    assert gate.passed and "no significant drop larger than 0.2000" in gate.reason


def test_churn_has_a_ceiling_when_configured():
    test, champ = _rows(300, 0.8, 0.8)
    churn = _vs_champion(test, _champion(champ), CFG.model_copy(update={"max_churn": 0.05}))["churn"]
    assert churn.status == "fail" and "vs ceiling 0.0500" in churn.reason and "of the 300 test rows" in churn.reason
    same = _vs_champion(test, _champion(dict(zip(test["id"], test["pred"]))), CFG.model_copy(update={"max_churn": 0}))
    assert same["churn"].passed and same["churn"].detail["churn"] == 0


def test_no_regression_fails_in_one_line_when_the_champion_cannot_be_loaded():
    test, _ = _rows(50, 0.8, 0.8)
    gates = _vs_champion(test, Rescore(version="3", stored_macro_f1=0.7, error="models:/m/3: no such artifact"))
    assert not gates["no_regression"].passed
    assert gates["no_regression"].reason == "champion v3 could not be scored again: models:/m/3: no such artifact"
    assert gates["churn"].reason.startswith("not measured: champion v3 could not be scored again")


def test_no_regression_after_a_label_change_compares_on_the_shared_labels():
    test, champ = _rows(300, 0.8, 0.8)
    shared = test[test["label"].isin(["db", "net"])]
    champion = _champion({i: champ[i] for i in shared["id"]}, labels=["db", "net"], added=["ui"], removed=["gui"])
    gate = _vs_champion(test, champion)["no_regression"]
    assert gate.passed and gate.detail["rows"] == len(shared) and gate.detail["labels"] == ["db", "net"]
    assert gate.reason.startswith(
        f"label set changed (added: ui; removed: gui); compared on the {len(shared)} test rows of the 2 shared labels; "
    )


def test_no_regression_with_no_shared_label_is_not_comparable():
    test, _ = _rows(50, 0.8, 0.8)
    gate = _vs_champion(test, Rescore(version="3", labels=[], added=["a", "b"], removed=["x"]))["no_regression"]
    assert not gate.passed
    assert gate.reason == (
        "label set changed (added: a, b; removed: x); not comparable: the candidate and champion v3 share no label"
    )


def test_a_champion_trained_on_todays_test_files_is_compared_on_rows_held_out_for_both():
    test, champ = _rows(1000, 0.8, 0.8, sources=10)
    gate = _vs_champion(test, _champion(champ, trained_on=["f1.py", "f2.py", "other.py"]))["no_regression"]
    assert gate.passed and gate.detail["rows"] == 800 and gate.detail["trained_on_test_files"] == 200
    assert (
        "champion v3 was trained on 2 files that are now test files (first: f1.py): "
        "compared on the 800 of 1000 test rows held out for both"
    ) in gate.reason
    nine = _champion(champ, trained_on=[f"f{i}.py" for i in range(1, 10)])  # 100 rows held out for both
    assert _vs_champion(test, nine)["no_regression"].detail["rows"] == 100
    few = _vs_champion(test, nine, CFG.model_copy(update={"min_comparable_rows": 101}))["no_regression"]
    assert not few.passed
    assert few.reason.endswith("not comparable: 100 test rows held out for both, fewer than 101")


def test_an_older_champion_without_a_recorded_split_is_compared_on_every_row_and_says_so():
    test, champ = _rows(100, 0.8, 0.8)
    gate = _vs_champion(test, _champion(champ, trained_on=None))["no_regression"]
    assert gate.detail["rows"] == 100 and "records no split (registered by an older lmforge)" in gate.reason


def test_beats_baselines_refuses_a_candidate_significantly_worse_than_the_cnn():
    versus = _versus(candidate_right=0.70, baselines={"cnn": 0.85, "tfidf_logreg": 0.72, "gru": 0.6})
    gate = beats_baselines_gate(CFG, {"vs_baselines": versus})
    assert not gate.passed and gate.detail["failing"] == ["cnn"] and gate.detail["strongest_baseline"] == "cnn"
    assert gate.reason.startswith("significantly worse than cnn of 3 trained baselines (promote.baselines: not_worse")
    assert "strongest baseline cnn: macro-F1 " in gate.reason and "Holm-adjusted p(worse) macro-F1 " in gate.reason
    assert "over 6 tests" in gate.reason and gate.detail["adjusted_p"]["cnn/macro_f1"] < 0.05


def test_beats_baselines_passes_a_candidate_within_noise_of_the_baselines_and_names_the_strongest():
    gate = beats_baselines_gate(CFG, {"vs_baselines": _versus(candidate_right=0.80)})
    assert gate.passed, gate.reason
    assert gate.reason.startswith("not significantly worse than any of 2 trained baselines")
    assert "strongest baseline cnn" in gate.reason or "strongest baseline tfidf_logreg" in gate.reason


def test_beats_baselines_modes():
    versus = _versus(candidate_right=0.80)
    better = beats_baselines_gate(CFG.model_copy(update={"baselines": "better"}), {"vs_baselines": versus})
    assert not better.passed and better.reason.startswith("not significantly better than ")
    clearly = _versus(candidate_right=0.95)
    assert beats_baselines_gate(CFG.model_copy(update={"baselines": "better"}), {"vs_baselines": clearly}).passed
    worse = _versus(candidate_right=0.5)
    report = beats_baselines_gate(CFG.model_copy(update={"baselines": "report"}), {"vs_baselines": worse})
    assert report.status == "not configured" and report.reason.startswith("significantly worse than ")
    assert report.passed  # a gate that only reports never blocks
    assert not beats_baselines_gate(CFG, {}).passed  # an evaluation without the comparison is not evidence


def test_auto_skips_a_variant_significantly_worse_than_a_baseline():
    variants = {
        "fp32": {**VARIANTS["fp32"], "vs_baselines": _versus(candidate_right=0.8)},
        "int8": {**VARIANTS["int8"], "vs_baselines": _versus(candidate_right=0.6)},
    }
    chosen, why = choose_variant(CFG, variants)
    assert chosen == "fp32" and why["int8"].startswith("significantly worse than cnn, tfidf_logreg of 2 trained")


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


def test_lock_record_reads_every_md5(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(LOCK)
    assert lock_record(lock) == {
        "ingest": {
            "deps": {"tasks/ingest.py": "aaa111"},
            "outs": {"data/raw/corpus.parquet": "bbb222", "data/raw/labeled.parquet": "ccc333"},
        },
        "tokenize": {"deps": {"data/clean/corpus.parquet": "ddd444", "data/tokenizer": "eee555.dir"}},
    }


def test_lock_record_without_lock_or_stages(tmp_path):
    assert lock_record(tmp_path / "dvc.lock") == {}
    (tmp_path / "empty.lock").write_text("")
    assert lock_record(tmp_path / "empty.lock") == {}
    (tmp_path / "nostages.lock").write_text("schema: '2.0'\nstages:\n")
    assert lock_record(tmp_path / "nostages.lock") == {}


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
