"""dvc.yaml, params.yaml and the code agree: every stage module imports, every section validates."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from tasks.config import STAGE_SECTIONS, Params, Paths, load_params

ROOT = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]


def test_params_yaml_loads_into_typed_config():
    params = load_params(ROOT / "params.yaml")
    for section in STAGE_SECTIONS:
        assert params.section(section) is not None
    assert set(PARAMS) == {"paths", "tracking", *STAGE_SECTIONS}


@pytest.mark.parametrize("section", STAGE_SECTIONS)
def test_every_section_is_a_typed_config(section):
    field = "validate_" if section == "validate" else section
    config_type = Params.model_fields[field].annotation
    assert config_type(**PARAMS[section]) == load_params(ROOT / "params.yaml").section(section)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_cmd_module_imports_and_has_main(stage):
    cmd = STAGES[stage]["cmd"]
    m = re.fullmatch(r"python -m (tasks\.\w+)", cmd)
    assert m, f"{stage}: cmd {cmd!r} should be `python -m tasks.<stage>`"
    module = importlib.import_module(m.group(1))
    assert callable(module.main) and callable(module.run)
    assert m.group(1) == f"tasks.{stage}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_its_module_and_params(stage):
    body = STAGES[stage]
    assert f"tasks/{stage}.py" in body["deps"]
    assert any(p == stage or str(p).startswith(f"{stage}") for p in body["params"])
    uses_models = stage in ("pretrain", "finetune", "compress", "evaluate")
    assert ("models" in body["deps"]) == uses_models


def test_every_interpolated_path_is_declared():
    text = (ROOT / "dvc.yaml").read_text()
    used = set(re.findall(r"\$\{paths\.(\w+)\}", text))
    assert used, "dvc.yaml should take its paths from params.yaml"
    assert used <= set(Paths.model_fields), used - set(Paths.model_fields)
    assert set(PARAMS["paths"]) == set(Paths.model_fields)


def test_dvc_params_refer_to_existing_keys():
    for stage, body in STAGES.items():
        for ref in body["params"]:
            node = PARAMS
            for part in str(ref).split("."):
                assert part in node, f"{stage}: params entry {ref!r} is not in params.yaml"
                node = node[part]


def test_every_stage_writes_its_metrics_file():
    for stage, body in STAGES.items():
        (metric,) = body["metrics"]
        (path,) = metric
        assert path == "${paths.metrics}/" + f"{stage}.json"
