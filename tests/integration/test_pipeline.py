"""The whole flow on a tiny config in a temporary copy of the project, then the real service over HTTP.

Real components throughout: a Prefect flow on its ephemeral server (own PREFECT_HOME), DVC in a
fresh git repository, an MLflow sqlite store and registry, Great Expectations suites and
`bentoml serve`. Also what a user compares runs with: `dvc status` after a code edit, `dvc metrics
diff`, `dvc plots diff` and `dvc exp run -S` (an experiment is an MLflow run too); what a user looks at the runs
with (`lmforge ui --prefect`); and two first runs started at once in a fresh clone.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LMFORGE, copy_tiny_run, free_port, start_logged, stop_group, wait_http

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tiny_flow_run, tmp_path_factory):
    """A copy of the tiny project after one uninterrupted `lmforge pipeline` (the session's reference run), with
    that run's output."""
    folder, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("pipeline"))
    return {"dir": folder, "env": env, "output": tiny_flow_run["output"]}


def test_flow_succeeds_without_tracebacks(project):
    assert "Traceback" not in project["output"], project["output"][-4000:]
    assert "promoted lmforge-classifier v1" in project["output"]
    for stage in (
        "ingest",
        "clean",
        "validate",
        "tokenize",
        "pretrain",
        "finetune",
        "prune",
        "sparsify",
        "distill",
        "quantize",
        "onnx",
        "evaluate",
    ):
        assert (project["dir"] / "metrics" / f"{stage}.json").exists(), stage


def test_registry_has_champion_with_lineage(project):
    import yaml

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=project["env"]["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("lmforge-classifier", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["gates"] == "passed"
    assert len(mv.tags["git_commit"]) == 40
    assert mv.tags["ge_success"] == "True"
    assert mv.tags["prefect_flow_run_id"]
    assert len(mv.tags) <= 40 and not any(k.startswith("dvc.") for k in mv.tags)
    lock = Path(
        mlflow.artifacts.download_artifacts(
            run_id=mv.tags["mlflow_promote_run_id"],
            artifact_path="lineage/dvc.lock",
            tracking_uri=project["env"]["MLFLOW_TRACKING_URI"],
        )
    ).read_text()
    assert "outs" in yaml.safe_load(lock)["stages"]["evaluate"]  # dvc.lock beside the version, not as tags
    assert all(mv.tags[f"gate.{g}"].startswith("pass") for g in ("min_accuracy", "smoke_test", "no_regression"))

    parent = client.get_run(mv.tags["mlflow_parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    stages = {r.data.tags["lmforge.stage"] for r in children}
    assert stages == {
        "ingest",
        "clean",
        "validate",
        "tokenize",
        "pretrain",
        "finetune",
        "prune",
        "sparsify",
        "distill",
        "quantize",
        "onnx",
        "evaluate",
        "kg_data",
        "kg_train",
        "kg_graph",
        "kg_evaluate",
        "align_data",
        "align_train",
        "align_index",
        "align_evaluate",
        "promote",
    }
    promotions = [r for r in children if r.data.tags["lmforge.stage"] == "promote"]
    assert len(promotions) == 3  # one per task: the classifier, the extractor, the encoder
    pretrain = next(r for r in children if r.data.tags["lmforge.stage"] == "pretrain")
    assert "val_perplexity" in pretrain.data.metrics and "tokens_per_s" in pretrain.data.metrics
    assert [d.dataset.name for d in pretrain.inputs.dataset_inputs] == ["tokens"]
    evaluate = next(r for r in children if r.data.tags["lmforge.stage"] == "evaluate")
    models = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{evaluate.info.run_id}'"
    )
    assert {r.data.tags["kind"] for r in models} >= {"transformer", "int8", "baseline"}
    assert all({"macro_f1", "accuracy"} <= set(r.data.metrics) for r in models)
    assert all("p50_ms_b32" in r.data.metrics for r in models if r.info.run_name != "majority")


def test_the_extractor_is_registered_with_its_graph_and_served_from_the_registry(project):
    """Task kg beside classification: lmforge-extractor v1 is @champion, its version holds the extractor and the
    graph, and the serving core's resolver loads both from the registry and answers /extract and SPARQL."""
    import mlflow
    from mlflow import MlflowClient

    env = project["env"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("lmforge-extractor", "champion")
    assert str(mv.version) == "1" and mv.tags["gates"] == "passed"
    assert mv.tags["gate.no_regression"].startswith("pass") and mv.tags["gate.smoke_test"].startswith("pass")
    assert mv.tags["gate.beats_baselines"].startswith("not configured")  # TINY_PROJECT reports it
    assert int(mv.tags["test_docs"]) > 0 and len(mv.tags["graph_sha256"]) == 64
    source = client.get_model_version_download_uri("lmforge-extractor", mv.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=env["MLFLOW_TRACKING_URI"]))
    assert (local / "artifacts" / "extractor" / "model.safetensors").is_file()
    graph = (local / "artifacts" / "graph" / "graph.nt").read_text()
    assert graph == (project["dir"] / "data" / "kg" / "graph" / "graph.nt").read_text()
    code = (
        "from deploy.core import extract, graph_query; from deploy.resolve import open_kg; "
        "from deploy.sparql import GraphQueries; import json; kg = open_kg(); graph = GraphQueries(kg.graph); "
        "print(json.dumps([kg.source, kg.version, extract(kg, ['Raise ValueError.'])[0], "
        "graph_query(graph, 'ASK { ?s ?p ?o }')])); graph.close()"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=project["dir"], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    source, version, extraction, answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert (source, version) == ("registry", "1")
    assert set(extraction) == {"entities", "relations", "model_version"} and answer == {"boolean": True}


def test_the_encoder_is_registered_with_its_index_and_served_from_the_registry(project):
    """Task align: lmforge-encoder v1 is @champion with its served mode, its version holds the encoder and the index
    align_evaluate scored, and the serving core's resolver loads both from the registry and searches."""
    import mlflow
    from mlflow import MlflowClient

    env = project["env"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("lmforge-encoder", "champion")
    assert str(mv.version) == "1" and mv.tags["gates"] == "passed", mv.tags
    assert mv.tags["gate.smoke_test"].startswith("pass") and mv.tags["gate.index_recall"].startswith("pass")
    assert mv.tags["gate.beats_bm25"].startswith("not configured")  # TINY_PROJECT reports it
    assert mv.tags["served_mode"] in ("dense", "bm25", "hybrid") and int(mv.tags["test_queries"]) > 0
    metrics = json.loads((project["dir"] / "metrics" / "align.json").read_text())
    assert mv.tags["encoder_sha256"] == metrics["encoder_sha256"] and mv.tags["index_sha256"] == metrics["index_sha256"]
    source = client.get_model_version_download_uri("lmforge-encoder", mv.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=env["MLFLOW_TRACKING_URI"]))
    assert (local / "artifacts" / "encoder" / "encoder.safetensors").is_file()
    assert (local / "artifacts" / "index" / "index.json").is_file()
    code = (
        "from deploy.core import search; from deploy.resolve import open_search; import json; s = open_search(); "
        "print(json.dumps([s.source, s.version, search(s, ['Return the message payload.'], 3)[0]]))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=project["dir"], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    source, version, answer = json.loads(res.stdout.strip().splitlines()[-1])
    assert (source, version) == ("registry", "1") and len(answer["results"]) == 3


def test_second_dvc_repro_runs_nothing(project):
    res = subprocess.run(
        ["dvc", "repro"], cwd=project["dir"], env=project["env"], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    assert "Running stage" not in res.stdout
    assert "Data and pipelines are up to date" in res.stdout


def _dvc(project, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`dvc *args` in the project (`dvc status ... dvc.yaml`: the pipeline, not the learning curve beside it)."""
    res = subprocess.run(
        ["dvc", *args], cwd=project["dir"], env=project["env"], capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_rerunning_validate_on_unchanged_data_makes_only_the_cost_report_stale(project):
    """The Data Docs change on every run (timestamps); downstream depends only on the deterministic result. The
    one reader of what changes is evaluate: its report's cost table reads every stage's metrics (the cost block)."""
    metrics = project["dir"] / "metrics" / "validate.json"
    before = metrics.read_bytes()
    _dvc(project, "repro", "--force", "--single-item", "validate")
    try:
        status = json.loads(_dvc(project, "status", "--json", "dvc.yaml").stdout)
        assert set(status) == {"evaluate"}, status
        assert status["evaluate"] == [{"changed deps": {"metrics/validate.json": "modified"}}], status
    finally:  # the run's own metrics file back, recorded as validate's output: nothing stale for the next test
        metrics.write_bytes(before)
        _dvc(project, "commit", "--force", "validate")
    assert json.loads(_dvc(project, "status", "--json", "dvc.yaml").stdout) == {}


def test_editing_a_config_default_makes_its_readers_stale(project):
    """A default edited in a config module (not in params.yaml) must not go unnoticed by DVC."""
    f = project["dir"] / "tasks/shared/config/training.py"
    original = f.read_text()
    f.write_text(original.replace("beta2: float = Field(0.95", "beta2: float = Field(0.96"))
    try:
        status = json.loads(_dvc(project, "status", "--json", "dvc.yaml").stdout)
    finally:
        f.write_text(original)
    # the stages that import the module (tokenize: it validates the pretrain section for `init_from`)
    assert set(status) == {
        "tokenize",
        "pretrain",
        "finetune",
        "prune",
        "sparsify",
        "distill",
        "kg_train",
        "align_train",
    }, status
    assert json.loads(_dvc(project, "status", "--json", "dvc.yaml").stdout) == {}


def test_metrics_diff_shows_the_committed_run_beside_this_one(project):
    """metrics/ is committed: `dvc metrics diff HEAD` puts HEAD's numbers beside this run's."""
    committed = subprocess.run(
        ["git", "show", "HEAD:metrics/evaluate.json"], cwd=project["dir"], capture_output=True, text=True
    )
    diff = json.loads(_dvc(project, "metrics", "diff", "HEAD", "--all", "--json").stdout)
    now = json.loads((project["dir"] / "metrics" / "evaluate.json").read_text())
    entry = diff["metrics/evaluate.json"]["variants.fp32.accuracy"]
    assert entry["new"] == now["variants"]["fp32"]["accuracy"]
    if committed.returncode == 0:  # the repository's own committed run, copied with the project
        assert entry["old"] == json.loads(committed.stdout)["variants"]["fp32"]["accuracy"]
    shown = _dvc(project, "metrics", "show", "--md").stdout
    assert "metrics/pretrain.json" in shown and "val_perplexity" in shown
    res = subprocess.run(
        [str(BIN / "lmforge"), "metrics", "pretrain"],
        cwd=project["dir"],
        env=project["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = {tuple(line.split()[:2]): line.split()[2] for line in res.stdout.splitlines()[1:]}
    assert (
        float(rows[("metrics/pretrain.json", "val_perplexity")])
        == json.loads((project["dir"] / "metrics/pretrain.json").read_text())["val_perplexity"]
    )


def test_an_experiment_is_an_mlflow_run_and_plots_overlay_it_on_the_commit(project):
    """Commit the run, then `dvc exp run -S`: DVC reruns only what the change touches, its stages nest
    under one MLflow run, and `dvc plots diff HEAD` overlays the experiment on the commit."""
    from mlflow import MlflowClient

    git = ["git", "-c", "user.email=ci@lmforge.test", "-c", "user.name=ci"]
    subprocess.run(git + ["add", "-A"], cwd=project["dir"], check=True)
    subprocess.run(git + ["commit", "-qm", "tiny run"], cwd=project["dir"], check=True)

    res = _dvc(project, "exp", "run", "-n", "fewer-latency-samples", "-S", "evaluate.latency_samples=3", timeout=600)
    assert "Running stage 'evaluate'" in res.stdout and "Running stage 'pretrain'" not in res.stdout
    assert "fewer-latency-samples" in _dvc(project, "exp", "show", "--json").stdout

    plots = json.loads(_dvc(project, "plots", "diff", "HEAD", "--json").stdout)
    assert not plots.get("errors"), plots["errors"]
    for name in ("pretrain_loss", "finetune_validation", "confusion", "per_class_f1", "f1_vs_latency"):
        (rendered,) = plots["data"][name]
        assert set(rendered["content"]["data"]["values"][0]) >= {"rev"}
        assert {v["rev"] for v in rendered["content"]["data"]["values"]} == {"HEAD", "workspace"}, name

    client = MlflowClient(tracking_uri=project["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("lmforge")
    filt = "tags.`lmforge.dvc_exp` = 'fewer-latency-samples' and tags.`lmforge.stage` = 'experiment'"
    (parent,) = client.search_runs([exp.experiment_id], filter_string=filt)
    assert parent.data.params["evaluate.latency_samples"] == "3"
    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert [r.data.tags["lmforge.stage"] for r in children] == ["evaluate"]
    assert children[0].data.params["evaluate.latency_samples"] == "3"


def test_prefect_ui_shows_the_run_its_tags_and_table_and_stops_on_sigterm(project, tiny_flow_run):
    """`lmforge ui --prefect` (make prefect-ui) serves the runs the pipeline recorded in PREFECT_HOME: the flow run
    tagged with commit, params digest and placement, its task runs, and its table of stage times and gates."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port, log = free_port(), project["dir"].parent / "prefect-ui.log"
    proc = start_logged([LMFORGE, "ui", "--prefect", "--port", str(port)], project["dir"], project["env"], log)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", proc, log)
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            (run,) = [r for r in client.read_flow_runs() if r.name and r.flow_id and r.state and r.state.is_completed()]
            tasks = client.read_task_runs()
            (table,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmforge-run"]))
            )
        # the commit the reference run ran on (this module's copy gains a commit in the experiment test)
        reference = Path(tiny_flow_run["base"]) / "project"
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=reference, capture_output=True, text=True)
        assert f"commit:{head.stdout.strip()[:12]}" in run.tags and "placement:local" in run.tags, run.tags
        assert any(t.startswith("params:") for t in run.tags), run.tags
        assert {"ingest", "pretrain", "evaluate"} <= {t.name for t in tasks}
        assert table.type == "table" and table.flow_run_id == run.id
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        steps = {(r["step"], r["kind"]): r for r in rows}
        assert steps[("pretrain", "stage")]["status"] == "Completed"
        assert steps[("min_accuracy", "gate classification")]["status"] == "PASS"
        assert f"Prefect UI: http://127.0.0.1:{port}/" in log.read_text()
        # the UI's pages call the API on this port, not on Prefect's default 4200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
            assert json.load(resp)["api_url"] == api
        proc.send_signal(signal.SIGTERM)  # the CLI only: it must stop its server
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        time.sleep(1)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{api}/health", timeout=5)
    finally:
        stop_group(proc)


@pytest.fixture
def fresh_clone(tiny_flow_run, tmp_path):
    """A copy of the reference run's project (DVC outputs current) with no MLflow store and no Prefect database,
    as a fresh clone whose data is pulled: the stores are what a first run creates."""
    folder, env = copy_tiny_run(tiny_flow_run, tmp_path)
    (tmp_path / "mlflow.db").unlink()
    shutil.rmtree(tmp_path / "prefect", ignore_errors=True)
    return folder, env


def test_two_first_runs_at_once_both_succeed_one_waiting(fresh_clone):
    """Two `lmforge pipeline` started together where no store exists yet: one waits for the workspace lock instead
    of migrating MLflow's and Prefect's databases beside the other (the issue's `_alembic_tmp_experiments` crash)."""
    folder, env = fresh_clone
    procs = [
        subprocess.Popen(
            [LMFORGE, "pipeline", "--no-promote"],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert not any("Traceback" in o for o in outs), outs
    assert sum("lmforge: waiting up to" in o for o in outs) == 1, outs
