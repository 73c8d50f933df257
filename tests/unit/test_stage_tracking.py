"""What the stage harness records in a stage's MLflow run when the stage asks: system metrics sampled while it runs
(and no sampling thread left behind), the stage outputs it reads as datasets named by their DVC md5, and only the
metrics it chooses. A real stage process on a real sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import write_params

from tasks.shared.cost import ROOT_ENV
from tasks.shared.datasets import dvc_md5

ROOT = Path(__file__).resolve().parents[2]

DEMO_STAGE = textwrap.dedent(
    """
    import threading, time

    from tasks.shared.harness import RunOptions, stage_main


    def run(params, tracker):
        time.sleep(1.5)  # long enough for a few samples at the test's interval
        return {"rows": 3, "per_model": {"a": 1.0}}


    options = RunOptions(
        system_metrics=True,
        inputs=("clean_labeled", "tokens"),
        logged=lambda m: {"rows": float(m["rows"]), "cost.wall_s": m["cost"]["wall_s"]},
    )
    stage_main("demo", run, {}, options)
    print("THREADS", sorted(t.name for t in threading.enumerate()))
    """
)


@pytest.mark.slow
def test_a_training_stage_records_system_metrics_its_input_datasets_and_the_metrics_it_chooses(tmp_path):
    (tmp_path / "demo.py").write_text(DEMO_STAGE)
    write_params(tmp_path)
    paths = yaml.safe_load((tmp_path / "params.yaml").read_text())["paths"]
    labeled, tokens = tmp_path / paths["clean_labeled"], tmp_path / paths["tokens"]
    labeled.parent.mkdir(parents=True)
    labeled.write_bytes(b"labeled rows")
    (tokens / "train").mkdir(parents=True)
    (tokens / "train" / "000.bin").write_bytes(b"\x00\x01" * 100)
    (tokens / "meta.json").write_text("{}")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.3",
    }
    for var in ("LMFORGE_PARENT_RUN_ID", "LMFORGE_SUPERVISOR_PID", "LMFORGE_STAGE_STATUS", ROOT_ENV):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "demo.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    threads = next(line for line in res.stdout.splitlines() if line.startswith("THREADS"))
    assert "SystemMetricsMonitor" not in threads, threads  # the sampler stopped with the run

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.`lmforge.stage` = 'demo'")
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system and "system/system_memory_usage_megabytes" in system
    assert {k for k in run.data.metrics if not k.startswith("system/")} == {"rows", "cost.wall_s"}
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"clean_labeled", "tokens"}
    assert inputs["clean_labeled"].dataset.digest == dvc_md5(labeled)
    assert inputs["tokens"].dataset.digest == dvc_md5(tokens) and inputs["tokens"].dataset.digest.endswith(".dir")
    tags = {t.key: t.value for t in inputs["tokens"].tags}
    assert tags["mlflow.data.context"] == "training" and (tags["files"], tags["bytes"]) == ("2", "202")
    assert json.loads(tags["source"]) == [str(tokens.resolve())]
