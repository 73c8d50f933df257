"""params.yaml and the code agree: every section validates, every field is listed with the code's default."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from tasks.ops.dag import pipeline_stages, stage_module
from tasks.shared.config.base import Paths, Section
from tasks.shared.config.params import SECTION_TYPES, load_params

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = pipeline_stages(ROOT)
"""Every stage: the default pipeline's and the learning curve's (curve/dvc.yaml)."""


def test_params_yaml_has_exactly_the_typed_sections():
    params = load_params(ROOT / "params.yaml")
    assert set(PARAMS) == set(SECTION_TYPES)
    for name in SECTION_TYPES:
        assert params.section(name) == SECTION_TYPES[name].model_validate(PARAMS[name])


def _field_problems(config_type: type[Section], listed: dict, prefix: str) -> list[str]:
    problems = []
    for name, field in config_type.model_fields.items():
        key = f"{prefix}.{name}"
        default = field.get_default(call_default_factory=True)
        if name not in listed:
            problems.append(f"{key}: missing from params.yaml (code default {default!r})")
        elif isinstance(default, BaseModel):
            problems += _field_problems(type(default), listed[name] or {}, key)
        elif config_type.model_validate({**listed, name: listed[name]}).__getattribute__(name) != default:
            problems.append(f"{key}: params.yaml says {listed[name]!r}, the code default is {default!r}")
    return problems


@pytest.mark.parametrize("section", [s for s in SECTION_TYPES if s != "paths"])
def test_every_field_is_in_params_yaml_with_the_code_default(section):
    """One source of defaults: what the code would use is what params.yaml shows (and DVC tracks)."""
    assert _field_problems(SECTION_TYPES[section], PARAMS[section], section) == []


def test_the_drift_check_names_a_missing_field_and_a_changed_default():
    listed = {k: v for k, v in PARAMS["pretrain"].items() if k != "beta2"}
    listed["lr"] = 0.5
    problems = _field_problems(SECTION_TYPES["pretrain"], listed, "pretrain")
    assert any(p.startswith("pretrain.beta2: missing") for p in problems)
    assert any(p.startswith("pretrain.lr: params.yaml says 0.5") for p in problems)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_module_declares_typed_sections_and_has_main(stage):
    module = importlib.import_module(stage_module(stage, STAGES[stage]))
    assert module.__name__ in (f"tasks.{stage}", f"tasks.{stage.replace('_', '.', 1)}")  # kg_graph: tasks.kg.graph
    assert callable(module.main) and callable(module.run)
    assert module.SECTIONS and all(SECTION_TYPES[name] is t for name, t in module.SECTIONS.items())
    assert stage in module.SECTIONS


def test_every_interpolated_path_is_declared():
    text = (ROOT / "dvc.yaml").read_text()
    used = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    assert used, "dvc.yaml should take its paths from params.yaml"
    assert used <= set(Paths.model_fields), used - set(Paths.model_fields)
    assert set(PARAMS["paths"]) == set(Paths.model_fields)


def test_every_stage_writes_its_metrics_file():
    for stage, body in STAGES.items():
        files = {path: value for metric in body["metrics"] for path, value in metric.items()}
        assert "${paths.metrics}/" + f"{stage}.json" in files  # kg_graph also writes the metrics/kg.json
        assert all(v == {"cache": False, "persist": True} for v in files.values())  # git-committed: `dvc metrics diff`


def test_every_output_persists_so_dvc_never_deletes_it_before_the_stage_checks_it():
    """DVC deletes a stage's outputs before running it unless `persist: true`; the stage itself refuses
    to replace anything lmforge did not write (tasks/shared/outputs.py)."""
    for stage, body in STAGES.items():
        for item in body.get("outs", []) + body.get("metrics", []):
            assert isinstance(item, dict), (stage, item)
            (options,) = item.values()
            assert options.get("persist") is True, (stage, item)


def test_plot_data_is_committed_not_cached():
    """`dvc plots diff <rev>` reads plot data from git, so a fresh clone can overlay any commit."""
    plot_files = {f for p in DVC["plots"] for spec in p.values() for f in spec["y"]}
    declared = {}
    for body in STAGES.values():
        for out in body.get("outs", []):
            if isinstance(out, dict):
                declared.update(out)
    assert plot_files and plot_files <= set(declared)
    assert all(declared[f] == {"cache": False, "persist": True} for f in plot_files)
    assert all(f.startswith("${paths.plots}/") for f in plot_files)
