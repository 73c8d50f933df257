"""params.yaml is checked whole by every entry point: `lmforge stage X`, `python -m tasks.X` (as `dvc repro` runs
it) and `lmforge check` refuse an unknown section, an unknown key in any section, a key written twice and a
declared section that is missing, in one line naming it; the check stays out of the stages' DVC deps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.ops import dag
from tasks.shared.config.base import read_params_file
from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _project(tmp_path: Path, text: str | None = None, **overrides) -> Path:
    """params.yaml (the project's with `overrides`, or `text`) and dvc.yaml in `tmp_path`."""
    f = write_params(tmp_path, **overrides)
    if text is not None:
        f.write_text(text)
    shutil.copy2(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _error(res: subprocess.CompletedProcess) -> str:
    """The one error line of a refused run (exit code 2, no traceback, nothing else on stderr)."""
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def _with_section_typo(tmp_path: Path) -> Path:
    text = (ROOT / "params.yaml").read_text().replace("\npretrain:", "\npretrian:", 1)
    return _project(tmp_path, text)


def test_lmforge_stage_refuses_a_misspelt_section_of_another_stage(tmp_path):
    cwd = _with_section_typo(tmp_path)
    line = _error(_run(cwd, "-m", "tasks.ops.cli", "stage", "ingest"))
    assert line == "lmforge ingest: error: params.yaml: pretrian: unknown section"
    assert not (cwd / "data" / "raw").exists()


def test_a_stage_run_alone_refuses_an_unknown_key_in_another_section(tmp_path):
    cwd = _project(tmp_path, **{"pretrain.lrr": 0.1})
    line = _error(_run(cwd, "-m", "tasks.ingest"))
    assert line == "lmforge ingest: error: params.yaml: pretrain.lrr: unknown key"


def test_a_duplicated_key_is_refused_in_one_line_by_stage_run_and_check(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  seed:"))  # ingest.seed
    section = next(line for line in reversed(lines[:first]) if line and not line[0].isspace()).split(":")[0]
    lines.insert(first + 1, "  seed: 7")
    cwd = _project(tmp_path, "\n".join(lines) + "\n")
    want = f"params.yaml: line {first + 2}: {section}.seed: duplicate key (first on line {first + 1})"
    assert _error(_run(cwd, "-m", "tasks.ops.cli", "stage", "ingest")) == f"lmforge ingest: error: {want}"
    assert _error(_run(cwd, "-m", "tasks.ops.cli", "check")) == f"lmforge: error: {want}"


def test_a_declared_section_missing_is_an_error_not_the_code_defaults(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["ingest"]
    cwd = _project(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    line = _error(_run(cwd, "-m", "tasks.ingest"))
    assert line.startswith("lmforge ingest: error: params.yaml has no `ingest:` section")


@pytest.mark.parametrize(
    "text,where",
    [
        ("a:\n  b: 1\n  c: 2\n  b: 3\n", "line 4: a.b: duplicate key (first on line 2)"),
        ("a:\n  - {x: 1}\n  - {x: 1, y: 2, x: 3}\n", "line 3: a[1].x: duplicate key (first on line 3)"),
        ("a: 1\nb: 2\na: 3\n", "line 3: a: duplicate key (first on line 1)"),
    ],
)
def test_duplicate_keys_are_named_with_their_line(tmp_path, text, where):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as err:
        read_params_file(f)
    assert str(err.value) == f"{f}: {where}"


def test_anchors_aliases_and_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("base: &b {x: 1, y: 2}\none: *b\ntwo:\n  <<: *b\n  y: 3\nthree:\n  <<: *b\n  <<: {z: 4}\n")
    assert read_params_file(f) == yaml.safe_load(f.read_text())


def test_the_whole_check_stays_out_of_the_stages_deps():
    """The harness imports params.py only to refuse a bad file: no stage depends on another stage's config."""
    closure = dag.import_closure("tasks.ingest")
    assert "tasks/shared/harness.py" in closure
    assert "tasks/shared/config/params.py" not in closure and "tasks/shared/config/pretrain.py" not in closure


def test_the_exemption_is_the_harness_import_only(tmp_path):
    """A module that imports params.py to use it still depends on it (and on every config module)."""
    (tmp_path / "tasks").mkdir()
    shutil.copytree(ROOT / "tasks" / "shared", tmp_path / "tasks" / "shared")
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "reader.py").write_text("from tasks.shared.config.params import load_params\n")
    closure = dag.import_closure("tasks.reader", tmp_path)
    assert {"tasks/shared/config/params.py", "tasks/shared/config/pretrain.py"} <= closure


def test_the_python_name_of_a_section_is_no_alias_for_it(tmp_path):
    """`validate:` is held as `Params.validate_` (pydantic models have a `validate` method); `validate_:` is a typo."""
    text = (ROOT / "params.yaml").read_text().replace("\nvalidate:", "\nvalidate_:", 1)
    f = _project(tmp_path, text) / "params.yaml"
    with pytest.raises(UserError) as err:
        load_params(f)
    assert str(err.value) == f"{f}: validate_: unknown section"
