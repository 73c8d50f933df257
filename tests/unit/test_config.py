"""load_params: the real params.yaml validates; every problem is one UserError line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.shared.config.params import Params, load_params
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.config.training import ModelSpec
from tasks.shared.config.validate import ValidateConfig
from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_real_params_yaml_loads():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params.pretrain.model.preset == raw["pretrain"]["model"]["preset"]
    assert params.pretrain.max_steps == raw["pretrain"]["max_steps"]
    assert isinstance(params.section("validate"), ValidateConfig)
    assert params.section("validate") is params.validate_
    assert str(params.paths.lm) == raw["paths"]["lm"]


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    f = write_params(tmp_path, **{"finetune.epoch": 3})
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg
    assert "finetune.epoch" in msg and "unknown key" in msg


def test_unknown_nested_key_names_full_path(tmp_path):
    f = write_params(tmp_path, **{"pretrain.model.n_layers": 2})
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "pretrain.model.n_layers" in msg


def test_bad_value_names_file_key_and_value(tmp_path):
    f = write_params(tmp_path, **{"pretrain.lr": -1})
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "pretrain.lr" in msg and "-1" in msg


def test_wrong_type_names_key(tmp_path):
    f = write_params(tmp_path, **{"tokenize.vocab_size": "big"})
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "tokenize.vocab_size" in msg and "'big'" in msg


def test_cross_field_check_names_section(tmp_path):
    f = write_params(tmp_path, **{"pretrain.min_lr": 1.0, "pretrain.lr": 0.1})
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "pretrain" in msg and "min_lr" in msg


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("paths:\n  lm: data/models/lm\npretrain: [unclosed\n  lr: 1\n")
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "invalid YAML" in msg
    assert " line " in msg


def test_missing_file_names_file(tmp_path):
    f = tmp_path / "nope" / "params.yaml"
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "not found" in msg


def test_not_a_mapping_is_rejected(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(UserError) as err:
        load_params(f)
    assert str(f) in _one_line(err)


def test_missing_paths_section_names_it(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["paths"]
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(params))
    with pytest.raises(UserError) as err:
        load_params(f)
    msg = _one_line(err)
    assert str(f) in msg and "paths" in msg


def test_model_spec_overrides_only_set_fields():
    spec = ModelSpec(preset="tiny", n_layer=3)
    assert spec.overrides() == {"n_layer": 3}
    assert PretrainConfig(model=spec).model.preset == "tiny"
