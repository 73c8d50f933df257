"""Faults a real user meets, on real processes: kills (SIGKILL, Ctrl-C) at several points of a tiny
pipeline, two runs at once, bad data and bad output paths through every driver, a stale evaluation.

The module works in a copy of the session's reference run whose pretrain and finetune outputs are
removed, so every run here trains those two stages again while DVC keeps the others cached. The runs
that are killed start Prefect's ephemeral server as users do; the others use the session's Prefect
server (`prefect_api`). Every
process a run starts carries a tag in its environment, so the tests can see whether any of them
outlives the run. The interrupted project must end with the same models and scores as the reference
run (training is bit-exact in the tiny config).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import LMFORGE, copy_tiny_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TAG = "LMFORGE_TEST_TAG"
DETERMINISTIC_OUTS = (
    "raw",
    "clean",
    "validation/results.json",
    "tokenizer",
    "tokens",
    "models/lm",
    "models/classifier",
    "models/int8",
    "models/baselines",
)


def tagged(tag: str, pattern: str = "") -> list[tuple[int, str]]:
    """Live processes whose environment carries `tag` (and whose command line contains `pattern`)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"{TAG}={tag}".encode() not in (d / "environ").read_bytes():
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and pattern in cmd:
            found.append((int(d.name), cmd))
    return found


def wait_for(predicate, seconds: float, what: str, run: "Run | None" = None):
    """`predicate()` once it is truthy; fails after `seconds`, or as soon as `run` has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            pytest.fail(f"the run exited ({run.proc.returncode}) before {what}: {run.output[-2000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {seconds:.0f} s waiting for {what}")


class Run:
    """`lmforge pipeline` started in the background, its output collected in a file."""

    def __init__(self, project: Path, env: dict, *args: str) -> None:
        self.tag = uuid.uuid4().hex
        self.log = project.parent / f"run-{self.tag[:8]}.log"
        self.out = self.log.open("w")
        self.proc = subprocess.Popen(
            [LMFORGE, "pipeline", *args],
            cwd=project,
            env={**env, TAG: self.tag},
            stdout=self.out,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.out.close()
        return code

    @property
    def output(self) -> str:
        return self.log.read_text()

    def processes(self, pattern: str = "") -> list[tuple[int, str]]:
        return tagged(self.tag, pattern)

    def assert_nothing_left(self, seconds: float = 20) -> None:
        wait_for(lambda: not self.processes(), seconds, f"the run's processes to exit: {self.processes()}")


def run_pipeline(project: Path, env: dict, *args: str, timeout: float = 600) -> tuple[int, str]:
    res = subprocess.run(
        [LMFORGE, "pipeline", *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    return res.returncode, res.stdout + res.stderr


def outs_md5(lock: dict) -> dict[str, str]:
    return {
        o["path"]: o["md5"]
        for body in lock["stages"].values()
        for o in body.get("outs", [])
        if o["path"].startswith(tuple(f"data/{p}" for p in DETERMINISTIC_OUTS))
    }


@pytest.fixture(scope="module")
def faulted(tiny_flow_run, tmp_path_factory):
    """A copy of the reference run without the models of pretrain and finetune (nor pretrain's checkpoints): the
    next run trains both again, from scratch, and finds every other stage up to date."""
    project, env = copy_tiny_run(tiny_flow_run, tmp_path_factory.mktemp("faults"))
    for folder in ("data/models/lm", "data/models/classifier", "data/checkpoints"):
        shutil.rmtree(project / folder)
    return {"dir": project, "env": env}


def test_sigkill_of_the_pipeline_stops_every_process_and_frees_the_workspace(faulted):
    """kill -9 of `lmforge pipeline` in pretrain, after its first checkpoint (a cancelled CI job, the OOM killer)."""
    project = faulted["dir"]
    run = Run(project, faulted["env"])
    wait_for(
        lambda: list((project / "data" / "checkpoints" / "pretrain").glob("step-*")),
        300,
        "pretrain's first checkpoint",
        run,
    )
    assert run.processes("tasks.pretrain"), "pretrain should be running"
    killed = time.monotonic()
    run.proc.send_signal(signal.SIGKILL)
    run.wait()
    run.assert_nothing_left(20)  # the flow, Prefect's server, dvc and the stage
    assert time.monotonic() - killed < 20
    from tasks.ops.lock import workspace_lock

    with workspace_lock(project, "test", timeout=1):  # nothing holds the workspace any more
        pass


def test_a_killed_stage_is_retried_and_ctrl_c_stops_the_run_within_seconds(faulted):
    """The rerun resumes pretrain from its checkpoint; SIGKILL of the stage itself is a crash that the
    flow retries (resuming again); Ctrl-C in finetune stops everything quietly with exit code 130."""
    project = faulted["dir"]
    checkpoints = project / "data" / "checkpoints" / "pretrain"
    newest = max((p.name for p in checkpoints.glob("step-*")), default="")
    run = Run(project, faulted["env"])
    wait_for(
        lambda: max((p.name for p in checkpoints.glob("step-*")), default="") > newest,
        300,
        "a new pretrain checkpoint",
        run,
    )
    for pid, _ in run.processes("tasks.pretrain"):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: run.processes("tasks.finetune"), 300, "finetune to start after pretrain was retried", run)
    time.sleep(1)
    interrupted = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130
    assert time.monotonic() - interrupted < 30
    run.assert_nothing_left(10)
    out = run.output
    assert "Traceback" not in out, out[-3000:]
    assert "pretrain: resuming from" in out, out[-3000:]
    assert "lmforge: pipeline interrupted" in out


def test_a_rerun_waits_for_the_workspace_then_ends_with_the_reference_run_s_models_and_scores(
    faulted, tiny_flow_run, prefect_api
):
    """The rerun after the kills first finds the workspace held (by this test, through the same lock a pipeline
    run takes): it says once that it waits, and proceeds when the holder lets go; a run started beside it that
    may wait only 2 s gives up in one line. The rerun finishes what the kills left: its models and scores are
    the reference run's."""
    from tasks.ops.lock import workspace_lock

    project, env = faulted["dir"], {**faulted["env"], "PREFECT_API_URL": prefect_api}
    with workspace_lock(project, what="lmforge pipeline (the first run)"):
        rerun = Run(project, env, "--lock-timeout", "300")
        impatient = Run(project, env, "--no-promote", "--lock-timeout", "2")
        assert impatient.wait(timeout=300) == 2, impatient.output[-3000:]
        wait_for(
            lambda: "lmforge: waiting up to 300 s for `lmforge pipeline (the first run)`" in rerun.output,
            180,
            "the rerun to wait",
            run=rerun,
        )
        time.sleep(2)  # still waiting, and said so once
    out = impatient.output
    assert "Traceback" not in out, out[-3000:]
    assert "is still held by `lmforge pipeline (the first run)`" in out, out[-3000:]

    assert rerun.wait() == 0, f"the rerun after the kills failed: {rerun.output[-4000:]}"
    out = rerun.output
    assert "Traceback" not in out, out[-4000:]
    waits = [line for line in out.splitlines() if "lmforge: waiting up to 300 s for `lmforge pipeline" in line]
    assert len(waits) == 1, out[-3000:]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert outs_md5(lock) == outs_md5(tiny_flow_run["dvc_lock"]), "the resumed run's outputs differ from the reference"
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    for variant in ("fp32", "int8"):
        for key in ("accuracy", "macro_f1"):
            assert evaluation["variants"][variant][key] == tiny_flow_run["evaluation"]["variants"][variant][key]
    assert evaluation["artifacts"] == tiny_flow_run["evaluation"]["artifacts"]


def test_a_data_error_through_the_flow_is_one_line_before_training(faulted, prefect_api):
    """The flow reports the stage's own line (the many kinds of bad data have their tests in test_ingest.py)."""
    rows, message = [("def f(): return 1", "a")] * 40, "labeled set has a single label 'a'"
    project = faulted["dir"]
    data = project / "data" / "user" / "labeled.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  labeled: stdlib", "  labeled: data/user/labeled.jsonl"))
    try:
        code, out = run_pipeline(project, {**faulted["env"], "PREFECT_API_URL": prefect_api}, "--no-promote")
    finally:
        params.write_text(original)
        # the flow `dvc add`-ed the input before ingest refused it: take back what that added, so the later
        # tests' `dvc repro` does not see a changed data/user (and rerun the whole tiny pipeline)
        for f in (data, data.with_name("labeled.jsonl.dvc"), data.with_name(".gitignore")):
            f.unlink(missing_ok=True)
    assert code == 2, out[-3000:]
    assert "dvc add data/user/labeled.jsonl" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith("lmforge: pipeline stopped:")]
    assert (
        line.startswith("lmforge: pipeline stopped: lmforge ingest: error: data/user/labeled.jsonl: ")
        and message in line
    ), out[-2000:]
    assert "NoneType: None" not in out


def test_bad_params_through_the_pipeline_are_one_line(faulted):
    params = faulted["dir"] / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  lr: 0.003", "  lr: .inf"))
    try:
        code, out = run_pipeline(faulted["dir"], faulted["env"], timeout=60)
    finally:
        params.write_text(original)
    assert code == 2
    assert out.strip().splitlines() == [
        "lmforge: error: params.yaml: pretrain.lr: Input should be a finite number (got inf)"
    ]


def test_dvc_repro_never_empties_a_folder_of_yours(faulted):
    """An output path pointed at an existing folder: DVC keeps it (persist) and the stage refuses."""
    project = faulted["dir"]
    mine = project / "reports"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("  evaluation: data/evaluation", "  evaluation: reports"))
    try:
        res = subprocess.run(
            ["dvc", "repro", "evaluate"], cwd=project, env=faulted["env"], capture_output=True, text=True, timeout=300
        )
    finally:
        params.write_text(original)
    assert res.returncode != 0
    assert (
        "lmforge evaluate: error: params.yaml: paths.evaluation: reports is an existing folder "
        "that lmforge did not write"
    ) in res.stderr
    assert "Traceback" not in res.stderr
    assert (mine / "notes.md").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == ["notes.md"]


def test_promote_refuses_an_evaluation_of_other_artifacts(faulted):
    """The issue's partial rerun: change a model upstream of evaluate and rebuild it (`dvc repro quantize` after a
    quantize param change: per-tensor instead of per-channel int8); evaluate is now stale, and `lmforge promote`
    is refused in one line, nothing registered, @champion unchanged."""
    from mlflow import MlflowClient

    project, env = faulted["dir"], faulted["env"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    before = sorted(int(v.version) for v in client.search_model_versions("name='lmforge-classifier'"))
    champion = client.get_model_version_by_alias("lmforge-classifier", "champion").version
    params = project / "params.yaml"
    original = params.read_text()
    assert "  per_channel: true" in original
    params.write_text(original.replace("  per_channel: true", "  per_channel: false", 1))  # quantize's, not onnx's
    try:
        res = subprocess.run(
            ["dvc", "repro", "quantize"], cwd=project, env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr[-2000:]
        res = subprocess.run([LMFORGE, "promote"], cwd=project, env=env, capture_output=True, text=True, timeout=120)
    finally:
        params.write_text(original)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "lmforge: error: the evaluation is not evidence for the current artifacts: "
        "dvc status reports 1 stage(s) out of date "
        "(evaluate; evaluate: changed deps: data/models/quantized (modified)); "
        "run `dvc repro` (or `make pipeline`), then promote"
    ]
    assert sorted(int(v.version) for v in client.search_model_versions("name='lmforge-classifier'")) == before
    assert client.get_model_version_by_alias("lmforge-classifier", "champion").version == champion
