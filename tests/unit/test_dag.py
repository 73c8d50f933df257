"""dvc.yaml's deps are complete by construction, stages never import each other, dvc.lock is current."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import copy_project

from tasks.ops import dag

ROOT = dag.ROOT


def test_dvc_yaml_deps_and_params_match_the_code():
    """Every stage depends on every project file it imports (transitively) and on exactly the
    params sections it reads; on failure, `lmforge deps --write` regenerates dvc.yaml."""
    assert dag.check_deps() == []


def test_stage_list_is_dvc_yaml_order_and_respects_dependencies():
    names = dag.stage_names()
    assert names[0] == "ingest" and names[-1] == "align_evaluate"
    assert names.index("tokenize") < names.index("pretrain") < names.index("finetune") < names.index("evaluate")
    assert names.index("pretrain") < names.index("kg_train") < names.index("kg_evaluate")
    align = [names.index(s) for s in ("pretrain", "align_data", "align_train", "align_index", "align_evaluate")]
    assert align == sorted(align)


def _stage_file(stage: str, body: dict) -> str:
    """The file of a stage's module (`python -m tasks.kg.data` -> tasks/kg/data.py)."""
    return dag.stage_module(stage, body).replace(".", "/") + ".py"


def _stage_files() -> set[str]:
    return {_stage_file(s, body) for s, body in dag.pipeline_stages().items()}


@pytest.mark.parametrize("stage", dag.pipeline_stages())
def test_a_stage_imports_shared_code_never_another_stage_or_an_operation(stage):
    body = dag.pipeline_stages()[stage]
    closure = dag.import_closure(dag.stage_module(stage, body))
    assert closure & _stage_files() == {_stage_file(stage, body)}
    assert not [f for f in closure if f.startswith(("tasks/ops/", "flows/", "deploy/"))]


def _stage_file(stage: str, body: dict) -> str:
    """`tasks/kg/graph.py` for `cmd: python -m tasks.kg.graph`."""
    return dag.stage_module(stage, body).replace(".", "/") + ".py"


@pytest.mark.parametrize(
    "file",
    sorted(p.relative_to(ROOT).as_posix() for p in [*ROOT.glob("tasks/shared/**/*.py"), *ROOT.glob("models/*.py")]),
)
def test_shared_code_and_models_import_no_stage_or_operation(file):
    module = file.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    closure = dag.import_closure(module)
    assert not [f for f in closure if f.startswith(("tasks/ops/", "flows/", "deploy/"))]
    assert not closure & _stage_files()
    if file.startswith("models/"):  # the MLflow pyfunc ships models/ alone
        assert all(f.startswith("models/") for f in closure)


def test_import_closure_follows_function_level_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "tasks"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("import json\n\ndef run():\n    from tasks.sub import helper\n")
    (pkg / "sub" / "helper.py").write_text("from . import deep\nfrom .deeper import thing\n")
    (pkg / "sub" / "deep.py").write_text("")
    (pkg / "sub" / "deeper.py").write_text("thing = 1\n")
    (pkg / "unused.py").write_text("")
    assert dag.import_closure("tasks.stage", tmp_path) == {
        "tasks/__init__.py",
        "tasks/stage.py",
        "tasks/sub/__init__.py",
        "tasks/sub/helper.py",
        "tasks/sub/deep.py",
        "tasks/sub/deeper.py",
    }


def test_a_missing_dep_is_named_and_write_deps_restores_it(tmp_path):
    project = copy_project(tmp_path)
    dvc_yaml = project / "dvc.yaml"
    text = dvc_yaml.read_text()
    broken = text.replace("      - tasks/shared/config/training.py\n", "", 1)
    assert broken != text
    dvc_yaml.write_text(broken)
    problems = dag.check_deps(project)
    assert problems == ["tokenize: imports tasks/shared/config/training.py but dvc.yaml does not list it in deps"]
    assert dag.write_deps(project)
    assert dag.check_deps(project) == []
    assert dvc_yaml.read_text() == text  # comments, order and data deps kept
    assert not dag.write_deps(project)


def test_an_unneeded_dep_and_wrong_params_are_named(tmp_path):
    project = copy_project(tmp_path)
    dvc_yaml = project / "dvc.yaml"
    text = dvc_yaml.read_text()
    text = text.replace("      - tasks/clean.py\n", "      - tasks/clean.py\n      - tasks/shared/engine/data.py\n", 1)
    text = text.replace("    params:\n      - clean\n", "    params:\n      - clean\n      - ingest\n", 1)
    dvc_yaml.write_text(text)
    problems = dag.check_deps(project)
    assert "clean: dvc.yaml lists tasks/shared/engine/data.py in deps but the stage does not import it" in problems
    assert any(
        p.startswith("clean: dvc.yaml params ['clean', 'ingest'] differ from tasks.clean.SECTIONS ['clean']")
        for p in problems
    )


def test_dvc_md5_matches_what_dvc_records():
    """The lock check hashes files and folders exactly as DVC 3 does (checked against DVC itself)."""
    from dvc.fs import LocalFileSystem
    from dvc_data.hashfile.hash import file_md5

    from tasks.shared.datasets import dvc_md5

    fs = LocalFileSystem()
    for f in ("tasks/shared/io.py", "params.yaml"):
        assert dvc_md5(ROOT / f) == file_md5(str(ROOT / f), fs)


def test_committed_lock_is_current():
    """The committed dvc.lock is the output of the committed code and params: every code or params
    dependency it records matches the working tree. After changing a stage, run the pipeline
    (`make pipeline` or `dvc repro`) and commit dvc.lock with metrics/."""
    assert dag.stale_lock() == []


def test_editing_a_config_default_makes_exactly_its_readers_stale(tmp_path):
    project = copy_project(tmp_path)
    before = set(dag.stale_lock(project))
    f = project / "tasks/shared/config/training.py"
    f.write_text(f.read_text().replace("beta2: float = Field(0.95", "beta2: float = Field(0.99"))
    new = set(dag.stale_lock(project)) - before
    readers = (
        "tokenize",  # validates the pretrain section, for pretrain.init_from
        "pretrain",
        "finetune",
        "prune",
        "sparsify",
        "distill",
        "kg_train",
        "align_train",
    )  # the training stages (prune, sparsify and distill reuse finetune's recipe; kg_train and align_train its loop)
    assert new == {f"{stage}: tasks/shared/config/training.py changed since dvc.lock was written" for stage in readers}
    params = project / "params.yaml"
    params.write_text(
        params.read_text().replace(
            "  beta2: 0.95                  # adamw\n", "  beta2: 0.99                  # adamw\n"
        )
    )
    assert "pretrain: params.yaml pretrain.beta2 is 0.99, dvc.lock has 0.95" in set(dag.stale_lock(project)) - before


def test_check_lock_command_names_the_stale_entries(tmp_path):
    project = copy_project(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    f = project / "tasks/clean.py"
    f.write_text(f.read_text() + "\n# an edit\n")
    res = subprocess.run(
        [sys.executable, "-m", "tasks.ops.cli", "check-lock"], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1
    assert "clean: tasks/clean.py changed since dvc.lock was written" in res.stdout
    assert "dvc.lock is stale" in res.stderr


def test_operations_import_no_heavy_library():
    """`lmforge promote --help`, `rollback`, `check-lock` start in a blink: file names and formats they
    need live in light modules, so importing them pulls in no torch, MLflow or Great Expectations."""
    code = (
        "import sys, tasks.ops.cli, tasks.ops.promote, tasks.ops.rollback, tasks.ops.dag\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'great_expectations', 'pandas') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
