"""Promotion end to end on the tiny project: a degraded candidate never becomes champion; overrides and rollbacks
leave an exact alias history.

One sequence in a copy of the session's tiny pipeline, with a real MLflow registry (sqlite) under a temp
folder: v1 (the tiny model) is promoted; v2, fine-tuned on rotated labels (every training label replaced by
another), is registered as @candidate and stopped by `no_regression` (the champion scored again on the same
test rows); v3, the same degraded model forced with a reason, becomes @champion as a recorded override;
`lmforge rollback` then restores v1. DVC is not run: the dvc.lock that the gates read is written from the
files' md5, as `dvc repro` would record them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from conftest import (
    LABELS,
    PARAMS_PATHS,
    TINY_CLEAN,
    TINY_EVALUATE,
    TINY_FINETUNE,
    TINY_VALIDATE,
    make_paths,
    write_params,
)

from tasks.shared.errors import UserError
from tasks.shared.io import write_json

pytestmark = pytest.mark.slow

NAME = "lmforge-classifier"
FORCED = "demo: accept the rotated-label model"


def md5(f: Path) -> str:
    return hashlib.md5(Path(f).read_bytes()).hexdigest()


def write_lock(root: Path, paths) -> None:
    """The dvc.lock entries the data_validation gate reads (validate, tokenize, finetune, evaluate),
    from the files' md5."""

    def entry(f) -> dict:
        return {"path": Path(f).relative_to(root).as_posix(), "hash": "md5", "md5": md5(f)}

    labeled, corpus, result = entry(paths.clean_labeled), entry(paths.clean_corpus), entry(paths.validation)
    stages = {
        "validate": {"cmd": "python -m tasks.validate", "deps": [corpus, labeled], "outs": [result]},
        "tokenize": {"cmd": "python -m tasks.tokenize", "deps": [corpus, result]},
        "finetune": {"cmd": "python -m tasks.finetune", "deps": [labeled, result]},
        "evaluate": {"cmd": "python -m tasks.evaluate", "deps": [labeled]},
    }
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))


def retrain(paths, relabel: dict[str, str], splits: tuple[str, ...], keep_baselines: bool = False) -> None:
    """Fine-tune again after renaming labels in `splits` of the labeled data, then validate and evaluate
    (fp32 alone; with `keep_baselines`, beside the baselines the tiny pipeline trained on the true labels)."""
    from tasks import evaluate, finetune, validate

    data = pd.read_parquet(paths.clean_labeled)
    rows = data["split"].isin(splits)
    data.loc[rows, "label"] = data.loc[rows, "label"].map(lambda lab: relabel.get(lab, lab))
    data.to_parquet(paths.clean_labeled, index=False)
    kept = Path(paths.baselines).parent / "kept-baselines"
    if keep_baselines:
        shutil.copytree(paths.baselines, kept)
    for folder in (paths.pruned, paths.sparse, paths.distilled, paths.quantized, paths.baselines):
        shutil.rmtree(folder, ignore_errors=True)
    validate.run(TINY_VALIDATE, TINY_CLEAN, sorted(set(data["label"])), True, paths)
    finetune.run(TINY_FINETUNE.model_copy(update={"baselines": []}), paths)
    if keep_baselines:
        shutil.rmtree(paths.baselines)
        kept.rename(paths.baselines)
    write_json(paths.metrics / "evaluate.json", evaluate.run(TINY_EVALUATE, paths).metrics)


@pytest.fixture(scope="module")
def story(tiny_pipeline, tmp_path_factory) -> SimpleNamespace:
    """v1 promoted, v2 (rotated labels) stopped, v3 (the same) forced, rollback to v1; the registry and
    every decision."""
    from typer.testing import CliRunner

    from deploy.resolve import load_service_bundle
    from mlflow import MlflowClient
    from models.bundle import write_bundle
    from models.tokenizer import TOKENIZER_FILE
    from tasks.ops import promote, registry, rollback
    from tasks.ops.cli import app
    from tasks.ops.gates import rescore_champion
    from tasks.shared.config.params import load_params

    root = tmp_path_factory.mktemp("promotion") / "project"
    shutil.copytree(Path(tiny_pipeline.paths.metrics).parent, root)
    paths = make_paths(root)
    write_json(paths.metrics / "evaluate.json", tiny_pipeline.evaluate.metrics)  # what `lmforge stage evaluate` writes
    overrides = {f"paths.{k}": str(getattr(paths, k)) for k in PARAMS_PATHS}
    gates = {
        "variant": "fp32",
        "min_accuracy": 0.0,
        "min_macro_f1": 0.0,
        "min_gain_over_majority": 0.0,
        "max_regression": 0.02,
        "min_behavioral_pass_rate": 0.0,
    }
    overrides |= {f"promote.{k}": v for k, v in gates.items()} | {
        "evaluate.batch_size": TINY_EVALUATE.batch_size,
        "tracking.artifacts": str(root / "mlartifacts"),
    }
    params_file = write_params(root, **overrides)
    out = SimpleNamespace(root=root, paths=paths)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.chdir(root)
        mp.setattr(
            promote, "require_current_evaluation", lambda root=None, stages=None: None
        )  # no DVC here: write_lock stands in for `dvc repro`
        params = load_params(params_file)
        write_lock(root, paths)
        out.good = promote.run(params, params_file)
        out.good_md5 = md5(paths.clean_labeled)
        # every training label wrong; evaluated beside the CNN, GRU and scratch baselines trained on the true labels
        retrain(paths, dict(zip(LABELS, LABELS[1:] + LABELS[:1])), ("train", "val"), keep_baselines=True)
        write_lock(root, paths)
        out.degraded = promote.run(params, params_file)
        out.degraded_md5 = md5(paths.clean_labeled)
        out.champion_after_degraded = str(MlflowClient().get_model_version_by_alias(NAME, registry.ALIAS).version)
        with pytest.raises(UserError, match="--force needs --reason"):
            promote.run(params, params_file, force=True, reason="  ")
        out.forced = promote.run(params, params_file, force=True, reason=FORCED)
        out.rolled_back = rollback.run(params)
        client = MlflowClient()
        out.history = registry.alias_history(client, NAME)
        out.versions = {v: client.get_model_version(NAME, v) for v in ("1", "2", "3")}
        out.champion = str(client.get_model_version_by_alias(NAME, registry.ALIAS).version)
        out.candidate = str(client.get_model_version_by_alias(NAME, registry.CANDIDATE).version)
        out.cli_history = CliRunner().invoke(app, ["history", "--params", str(params_file)])
        out.cli_force = CliRunner().invoke(app, ["promote", "--params", str(params_file), "--force"])
        out.missing = rescore_champion(
            client, NAME, SimpleNamespace(version="9", tags={}, run_id="0" * 32), paths, TINY_EVALUATE, LABELS
        )
        # a candidate whose label `ui` became `gui`: compared with the champion (v1) on the shared labels only
        retrain(paths, {"ui": "gui"}, ("train", "val", "test"))
        bundle = root / "relabeled-bundle"
        write_bundle(bundle, paths.tokenizer / TOKENIZER_FILE, paths.classifier, None)
        labels = load_service_bundle(str(bundle)).labels
        out.relabeled = rescore_champion(
            client, NAME, client.get_model_version(NAME, "1"), paths, TINY_EVALUATE, labels
        )
    return out


def test_a_good_candidate_becomes_champion_and_candidate(story):
    assert story.good.promoted and story.good.passed and story.good.version == "1"
    gates = {g.name: g for g in story.good.gates}
    assert gates["no_regression"].reason == "no current champion"
    assert gates["beats_baselines"].passed and "of 4 trained baselines" in gates["beats_baselines"].reason
    split = story.versions["1"].tags
    assert int(split["test_rows"]) == int((pd.read_parquet(story.paths.clean_labeled)["split"] == "test").sum())
    assert len(split["test_rows_sha256"]) == 64
    assert (
        gates["data_validation"].passed
        and f"labeled.parquet md5 {story.good_md5[:12]}" in gates["data_validation"].reason
    )
    assert gates["lm_perplexity"].passed and "vs ceiling 200.00" in gates["lm_perplexity"].reason


def test_a_degraded_candidate_never_becomes_champion(story):
    d = story.degraded
    assert d.version == "2" and not d.promoted and not d.overridden
    assert story.champion_after_degraded == "1"
    validation = {g.name: g for g in d.gates}["data_validation"]
    assert (
        validation.passed and f"labeled.parquet md5 {story.degraded_md5[:12]}" in validation.reason
    )  # the new data version, validated
    assert "no_regression" in d.failed and "beats_baselines" in d.failed
    gate = {g.name: g for g in d.gates}["no_regression"]
    m1 = float(story.versions["1"].tags["test_macro_f1"])
    m2 = float(story.versions["2"].tags["test_macro_f1"])
    assert m2 < m1 - 0.02, (m1, m2)
    # both scores, on the same rows: the candidate as evaluate scored it, champion v1 scored again
    # (equal to its stored score: same rows, same code), the difference's interval and the p-values
    rows = int((pd.read_parquet(story.paths.clean_labeled)["split"] == "test").sum())
    assert gate.reason.startswith(
        f"macro-F1 {m2:.4f} (candidate) vs {m1:.4f} (champion v1, scored again; stored {m1:.4f}), difference "
    )
    assert f"; {rows} rows; Holm-adjusted p(worse): macro-F1 " in gate.reason and "[95% CI " in gate.reason
    assert gate.reason.endswith("significant drop larger than 0.0200 in macro_f1 and accuracy (α 0.05)")
    assert gate.detail["adjusted_p"]["macro_f1"] < 0.05 and gate.detail["adjusted_p"]["accuracy"] < 0.05
    assert gate.detail["churn"] > 0.5
    # and it loses to the CNN trained on the true labels, beyond noise
    baselines = {g.name: g for g in d.gates}["beats_baselines"]
    assert "cnn" in baselines.detail["failing"] and baselines.detail["adjusted_p"]["cnn/macro_f1"] < 0.05
    assert baselines.reason.startswith("significantly worse than ") and "p(worse)" in baselines.reason
    tags = story.versions["2"].tags
    assert tags["gates"] == "failed"
    assert tags["gate.no_regression"] == f"fail: {gate.reason}"
    assert json.loads(tags["gate.no_regression.p_values"]) == gate.detail["adjusted_p"]
    assert "override" not in story.versions["2"].tags


def test_a_version_keeps_a_short_set_of_tags_and_its_full_record_in_the_promote_run(story):
    """At most MAX_VERSION_TAGS tags (no per-entry copy of dvc.lock); dvc.lock, gates.json and every test metric
    are in the promote run; the version's description is the gate table; the model has a signature and an example."""
    import mlflow
    from deploy.requests import EXAMPLE_INPUT
    from mlflow import MlflowClient
    from tasks.ops.lineage import INPUTS_TAG, LOCK_ARTIFACT, PRECISION_TAG
    from tasks.ops.promote import MAX_VERSION_TAGS

    uri = f"sqlite:///{story.root}/mlflow.db"
    mlflow.set_tracking_uri(uri)  # the store the story's promotions wrote to
    client = MlflowClient(uri)
    for version, decision in (("1", story.good), ("3", story.forced)):
        mv = story.versions[version]
        assert len(mv.tags) <= MAX_VERSION_TAGS, sorted(mv.tags)
        assert not [k for k in mv.tags if k.startswith(("dvc.", "choice."))]
        inputs = json.loads(mv.tags[INPUTS_TAG])  # dvc.lock's data inputs: here the files write_lock lists
        assert "data/clean/labeled.parquet" in inputs and all(len(md5) == 32 for md5 in inputs.values())
        assert isinstance(json.loads(mv.tags[PRECISION_TAG]), dict)
        assert mv.description.startswith(f"**{NAME}** (fp32): ")
        assert all(f"| {g.name} | {g.status} |" in mv.description for g in decision.gates)
        run = mv.tags["mlflow_promote_run_id"]
        assert client.get_run(run).data.tags["mlflow.note.content"] == mv.description
        lock = mlflow.artifacts.load_text(f"runs:/{run}/{LOCK_ARTIFACT}")
        assert yaml.safe_load(lock)["stages"]["evaluate"]["cmd"] == "python -m tasks.evaluate"
        gates = mlflow.artifacts.load_dict(f"runs:/{run}/gates.json")
        assert [g["name"] for g in gates["gates"]] == [g.name for g in decision.gates] and "fp32" in gates["choice"]
        assert {"test_macro_f1", "test_p99_ms_b1", "test_tokenize_ms_b32"} <= set(client.get_run(run).data.metrics)
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert [c["type"] for c in info.signature.inputs.to_dict()] == ["string"]  # a list of texts in
    example = mlflow.models.Model.load(f"models:/{NAME}/1").load_input_example(
        mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", tracking_uri=uri)
    )
    assert list(example) == EXAMPLE_INPUT


def test_a_forced_promotion_is_an_override_on_the_version_and_in_the_history(story):
    f = story.forced
    assert f.version == "3" and f.promoted and f.overridden and "no_regression" in f.failed
    tags = story.versions["3"].tags
    assert tags["gates"] == "failed" and tags["override"].endswith(FORCED)


def test_the_alias_history_records_every_move_in_order(story):
    failed = ", ".join(story.degraded.failed)
    assert [(e["alias"], e["from"], e["to"], e["override"], e["action"]) for e in story.history] == [
        ("candidate", None, "1", False, "evaluate"),
        ("champion", None, "1", False, "promote"),
        ("candidate", "1", "2", False, "evaluate"),
        ("candidate", "2", "3", False, "evaluate"),
        ("champion", "1", "3", True, "promote"),
        ("champion", "3", "1", False, "rollback"),
    ]
    reasons = [e["reason"] for e in story.history]
    assert reasons == [
        "evaluated: gates passed; fp32",
        "promoted: every gate passed (fp32)",
        f"evaluated: gates failed ({failed}); fp32",
        f"evaluated: gates failed ({failed}); fp32",
        f"forced over failed gates ({failed}): {FORCED}",
        "rollback from v3",
    ]
    assert all(e["user"] and e["time"] for e in story.history)
    assert (story.champion, story.candidate, story.rolled_back) == ("1", "3", "1")


def test_lmforge_history_prints_both_aliases(story):
    assert story.cli_history.exit_code == 0, story.cli_history.output
    lines = story.cli_history.output.strip().splitlines()
    assert len(lines) == 6
    assert "  champion   v1 -> v3  " in lines[4] and lines[4].endswith(f"{FORCED}  OVERRIDE")
    assert "  candidate  v- -> v1  " in lines[0]


def test_promote_force_without_a_reason_is_a_one_line_error(story):
    assert story.cli_force.exit_code == 2
    assert (
        story.cli_force.output.strip()
        == 'lmforge: error: --force needs --reason "why": the override is recorded in the registry'
    )


def test_a_champion_that_cannot_be_loaded_is_a_reason_not_a_crash(story):
    from tasks.ops.gates import champion_gates
    from tasks.shared.config.promote import PromoteConfig

    assert story.missing.error and "\n" not in story.missing.error and "9" in story.missing.error
    test = pd.DataFrame({"id": ["a"], "source": ["f"], "label": ["x"], "pred": ["x"]})
    gate = champion_gates(PromoteConfig(), test, story.missing, 1000, 0)[0]
    assert not gate.passed and gate.reason.startswith("champion v9 could not be scored again: ")


def test_a_changed_label_set_is_compared_on_the_shared_labels(story):
    r = story.relabeled
    assert (r.labels, r.added, r.removed) == (["db", "net"], ["gui"], ["ui"])
    test = pd.read_parquet(story.paths.clean_labeled).query("split == 'test'")
    shared = test[test["label"].isin(["db", "net"])]
    assert sorted(r.predictions) == sorted(shared["id"]) and len(shared) < len(test) and r.error is None
    assert r.trained_on == sorted(set(pd.read_parquet(story.paths.clean_labeled).query("split != 'test'")["source"]))
