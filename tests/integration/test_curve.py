"""The learning curve (curve/dvc.yaml) as users start it, on the tiny project's trained outputs; and the default
pipeline's staleness checks never waiting for it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import LABELS, ROOT, TINY, copy_project, update_params, write_params

from tasks.ops.dag import dvc_command, stale_stages

pytestmark = pytest.mark.integration

CURVE = {"per_label": [2, 0], "seeds": [1, 2], "min_steps": 12, "bootstrap_resamples": 200}
"""Small enough for seconds: 2 sizes x 2 seeds x 4 models on the tiny data (8 training files of 6 functions per
label, 12 test rows per label)."""


@pytest.fixture
def curve_project(tmp_path, tiny_pipeline) -> Path:
    """The tiny pipeline's inputs to the curve (cleaned data, validation, tokenizer, LM) in a project folder of its
    own, with both pipeline files and the tiny params."""
    project = tmp_path / "project"
    src = tiny_pipeline.paths
    (project / ".dvc" / "tmp").mkdir(parents=True)
    (project / "curve").mkdir()
    shutil.copy2(ROOT / "dvc.yaml", project / "dvc.yaml")
    shutil.copy2(ROOT / "curve" / "dvc.yaml", project / "curve" / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    for key in ("clean_labeled", "validation", "tokenizer", "lm"):
        dst = project / params[key]
        dst.parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if Path(getattr(src, key)).is_dir() else shutil.copy2
        copy(getattr(src, key), dst)
    write_params(project)
    update_params(project, {"finetune": TINY["finetune"], "evaluate": TINY["evaluate"], "curve": CURVE})
    return project


def test_curve_trains_every_model_on_every_size_and_reports_intervals(curve_project, mlflow_db):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_db, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LMFORGE_PARENT_RUN_ID", None)
    res = subprocess.run(
        [sys.executable, "-m", "tasks.curve"], cwd=curve_project, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    progress = [line for line in res.stdout.splitlines() if line.startswith("curve: ")]
    assert len(progress) == 2 * 2 * 4 and "curve: pretrained k=2 seed=1: test macro-F1 " in progress[0]

    curve = json.loads((curve_project / "metrics" / "curve.json").read_text())
    assert curve["labels"] == len(LABELS) and curve["test_rows"] == len(LABELS) * 12
    assert set(curve["models"]) == {"pretrained", "scratch", "cnn", "tfidf"}
    for name, by_k in curve["models"].items():
        assert list(by_k) == ["2", "all"], name
        for k, entry in by_k.items():
            for metric in ("macro_f1", "accuracy"):
                low, high = entry[f"{metric}_ci95"]
                assert 0 <= low <= entry[metric] <= high <= 1, (name, k, metric, entry)
            assert [s["seed"] for s in entry["seeds"]] == [1, 2]
            assert entry["macro_f1"] == pytest.approx(sum(s["macro_f1"] for s in entry["seeds"]) / 2, abs=1e-4)
            assert entry["examples_per_label"] == (48 if k == "all" else int(k))
            if name != "tfidf":
                assert all(s["steps"] >= CURVE["min_steps"] for s in entry["seeds"])
    for k in ("2", "all"):
        for other, diff in curve["pretrained_vs"][k].items():
            low, high = diff["macro_f1_diff_ci95"]
            assert low <= diff["macro_f1_diff"] <= high and 0 < diff["macro_f1_p_not_better"] <= 1, (k, other)

    rows = (curve_project / "metrics" / "plots" / "curve_macro_f1.csv").read_text().splitlines()
    assert rows[0] == "examples_per_label,pretrained,scratch,cnn,tfidf" and len(rows) == 3
    png = curve_project / "data" / "curve" / "curve_macro_f1.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import pandas as pd

    preds = pd.read_parquet(curve_project / "data" / "curve" / "predictions.parquet")
    assert len(preds) == 2 * 2 * 4 * curve["test_rows"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert "curve_macro_f1.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    last_seed = curve["models"]["pretrained"]["all"]["seeds"][-1]["macro_f1"]
    assert run.data.metrics["pretrained/all/test_macro_f1"] == pytest.approx(last_seed, abs=1e-4)


def test_the_default_pipeline_never_waits_for_the_curve(tmp_path):
    """`dvc status` alone reports the curve's stage (it never ran); the checks that promotion and retrain rely on
    look at the default pipeline only, so the curve never makes it stale."""
    project = copy_project(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    res = subprocess.run(dvc_command("status", "--json"), cwd=project, capture_output=True, text=True, check=True)
    assert "curve/dvc.yaml:curve" in json.loads(res.stdout)
    assert not [stage for stage in stale_stages(project) if "curve" in stage]
