"""Tasks as a notion: the registry, the `tasks:` section, which stages a run covers, and the extractor's
number-only promotion gates (no MLflow needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.pipeline import summary_markdown
from tasks.ops.dag import stage_names
from tasks.ops.promote_kg import _regression_verdict, baselines_gate
from tasks.shared.config.promote_kg import PromoteKgConfig
from tasks.shared.config.tasks import TasksConfig
from tasks.shared.tasks import SHARED_STAGES, TASKS, promotion, selected_stages, task_of


def test_every_stage_of_dvc_yaml_is_shared_or_owned_by_exactly_one_task():
    stages = stage_names()
    for stage in stages:
        owners = [t.name for t in TASKS.values() if stage in t.stages]
        assert (stage in SHARED_STAGES) != bool(owners), stage
        assert len(owners) <= 1, (stage, owners)
    for task in TASKS.values():  # a task's stages exist, in dvc.yaml's order
        assert [s for s in stages if s in task.stages] == list(task.stages)


def test_a_run_of_one_task_keeps_the_shared_stages_and_drops_the_other_tasks():
    stages = stage_names()
    only_kg = selected_stages(stages, ["kg"])
    assert only_kg == [*SHARED_STAGES, *TASKS["kg"].stages]
    assert selected_stages(stages, ["classification", "kg", "align"]) == stages
    assert selected_stages(stages, ["align"]) == [*SHARED_STAGES, *TASKS["align"].stages]
    assert task_of("finetune") == "classification" and task_of("kg_graph") == "kg" and task_of("clean") is None


def test_every_task_names_a_promotion_that_imports():
    for task in TASKS.values():
        assert callable(promotion(task))


@pytest.mark.parametrize(
    "enabled, message",
    [(["classification", "ner"], "unknown task"), (["kg", "kg"], "listed twice"), ([], "at least 1")],
)
def test_tasks_section_names_the_problem(enabled, message):
    with pytest.raises(ValidationError, match=message):
        TasksConfig(enabled=enabled)


def _versus(diff: float, p: float) -> dict:
    return {"diff": diff, "ci95": [diff - 0.02, diff + 0.02], "p_value": p}


EVALUATION = {
    "entity_f1": 0.80,
    "entity_f1_baseline": 0.70,
    "entity_f1_vs_baseline": _versus(0.10, 0.001),
    "relation_f1": 0.60,
    "relation_f1_baseline": 0.50,
    "relation_f1_vs_baseline": _versus(0.10, 0.004),
    "linking_accuracy": 0.90,
    "linking_accuracy_baseline": 0.88,
    "linking_accuracy_vs_baseline": _versus(0.02, 0.2),
}


def test_beats_baselines_better_fails_on_the_head_that_is_not_significantly_better():
    gate = baselines_gate(PromoteKgConfig(baselines="better"), EVALUATION)
    assert not gate.passed and gate.reason.startswith("linking_accuracy not significantly better")
    assert gate.detail["adjusted_p"]["entity_f1"] == pytest.approx(0.003)  # Holm: 3 x the smallest p-value
    assert baselines_gate(PromoteKgConfig(baselines="not_worse"), EVALUATION).passed
    report = baselines_gate(PromoteKgConfig(baselines="report"), EVALUATION)
    assert report.passed and report.status == "not configured"


def test_beats_baselines_skips_a_head_that_was_not_measured():
    no_links = {**EVALUATION, "linking_accuracy": None}
    gate = baselines_gate(PromoteKgConfig(baselines="better"), no_links)
    assert gate.passed and "linking" not in gate.reason


def test_no_regression_fails_only_on_a_significant_drop_larger_than_the_tolerance():
    cfg = PromoteKgConfig(max_regression=0.02, alpha=0.05)
    small = {"entity_f1": _versus(-0.01, 0.001), "relation_f1": _versus(0.0, 0.5)}
    assert _regression_verdict(cfg, small, "3", 200).passed
    noisy = {"entity_f1": _versus(-0.05, 0.2), "relation_f1": _versus(0.0, 0.5)}
    assert _regression_verdict(cfg, noisy, "3", 200).passed
    drop = {"entity_f1": _versus(-0.05, 0.001), "relation_f1": _versus(0.0, 0.5)}
    gate = _regression_verdict(cfg, drop, "3", 200)
    assert not gate.passed and "entity_f1 significantly below champion v3" in gate.reason


def test_the_run_summary_shows_each_tasks_scores_and_promotion():
    decision = {
        "registered_model": "lmforge-extractor",
        "variant": "extractor",
        "version": "2",
        "promoted": True,
        "gates": [{"gate": "beats_baselines", "status": "pass", "passed": True, "reason": "every head ..."}],
        "choice": {"extractor": "the extractor of task kg"},
    }
    metrics = {**EVALUATION, "entity_f1_ci95": [0.78, 0.82], "entity_f1_baseline_ci95": [0.68, 0.72]}
    text = summary_markdown(None, None, None, {"kg": (metrics, decision)})
    assert "| entity_f1 | 0.8000 [0.7800, 0.8200] | 0.7000 [0.6800, 0.7200] |" in text
    assert "## Promotion: lmforge-extractor extractor v2 promoted to @champion" in text
    assert "PASS **beats_baselines**" in text
