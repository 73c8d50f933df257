"""How a stage is run: the status it writes when it ends, and the flow's task reading it after `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import write_params

from tasks.shared.stagerun import (
    STATUS_DIR,
    STATUS_ENV,
    StageStatus,
    new_status_file,
    take_status,
    write_status,
)

ROOT = Path(__file__).resolve().parents[2]

DEMO_STAGE = textwrap.dedent(
    """
    import os, signal

    from tasks.shared.errors import UserError
    from tasks.shared.harness import stage_main


    def run(params, tracker):
        how = os.environ.get("DEMO", "ok")
        if how == "user":
            raise UserError("data/demo.csv: row 3: label is missing")
        if how == "crash":
            raise RuntimeError("a bug")
        if how == "kill":  # the OOM killer: no chance to say anything
            os.kill(os.getpid(), signal.SIGKILL)
        return {"rows": 3}


    stage_main("demo", run, {})
    """
)


@pytest.fixture
def demo(tmp_path):
    """A DVC project whose one stage `demo` runs through the real stage harness; its environment."""
    (tmp_path / "demo.py").write_text(DEMO_STAGE)
    (tmp_path / "dvc.yaml").write_text("stages:\n  demo:\n    cmd: python demo.py\n")
    write_params(tmp_path)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    }
    for var in ("LMFORGE_PARENT_RUN_ID", "PREFECT_API_URL", "LMFORGE_SUPERVISOR_PID", STATUS_ENV):
        env.pop(var, None)
    return tmp_path, env


@pytest.mark.parametrize(
    "how,code,line",
    [
        ("user", 2, "lmforge demo: error: data/demo.csv: row 3: label is missing"),
        ("crash", 1, "lmforge demo: crashed: RuntimeError: a bug"),
    ],
)
def test_the_stage_writes_how_it_ended_where_the_runner_asks(demo, how, code, line):
    root, env = demo
    status = root / "status.json"
    res = subprocess.run(
        [sys.executable, "demo.py"],
        cwd=root,
        env={**env, "DEMO": how, STATUS_ENV: str(status)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == code, res.stderr
    assert json.loads(status.read_text()) == {"stage": "demo", "exit_code": code, "message": line}
    if how == "user":  # the same line the user sees (after MLflow's own log of creating its store)
        assert res.stderr.strip().splitlines()[-1] == line and "Traceback" not in res.stderr
    if how == "crash":  # an internal error keeps its traceback
        assert "Traceback" in res.stderr and line in status.read_text()


def test_without_a_runner_asking_the_stage_writes_no_status(demo):
    root, env = demo
    res = subprocess.run(
        [sys.executable, "demo.py"], cwd=root, env={**env, "DEMO": "user"}, capture_output=True, timeout=120
    )
    assert res.returncode == 2
    assert not (root / STATUS_DIR).exists()


def test_a_status_is_read_once_and_every_attempt_has_a_file_of_its_own(tmp_path):
    first, second = new_status_file("pretrain", tmp_path), new_status_file("pretrain", tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / STATUS_DIR
    write_status(StageStatus("pretrain", 2, "lmforge pretrain: error: bad"), first)
    assert take_status(first) == StageStatus("pretrain", 2, "lmforge pretrain: error: bad")
    assert not first.exists() and take_status(first) is None  # taken: a later attempt cannot read it
    assert take_status(second) is None  # killed before it could write
    second.write_text('{"stage": "pretrain", "exit')  # torn: never written by write_status, which renames
    assert take_status(second) is None


RUNNER = textwrap.dedent(
    """
    import json, os, sys
    from prefect import flow

    from flows.stages import exit_code, is_user_error, run_stage, worth_retrying
    from tasks.shared.stagerun import stage_env


    @flow
    def attempt(how: str) -> dict:
        os.environ["DEMO"] = how  # what the demo stage does (stage_env passes this environment on)
        state = run_stage("demo", stage_env(""), return_state=True)
        out = {"completed": state.is_completed(), "message": state.message}
        if state.is_completed():
            out["metrics"] = state.result()
        else:
            out |= {"user_error": is_user_error(state), "code": exit_code(state),
                    "retried": worth_retrying(None, None, state)}
        return out


    print("RESULT " + json.dumps({how: attempt(how) for how in sys.argv[1:]}))
    """
)


@pytest.mark.slow
def test_the_flow_task_learns_how_the_stage_ended_from_its_status(demo):
    """`run_stage` runs `dvc repro --single-item` and reads the stage's own status: a user error is a Failed
    state with the stage's line, never retried; a stage killed before it could write (with a stale status of
    an earlier attempt lying beside it) is a crash, retried; a success returns the stage's metrics."""
    root, env = demo
    stale = root / STATUS_DIR / "demo-0123456789abcdef.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"stage": "demo", "exit_code": 2, "message": "lmforge demo: error: an earlier run"}))
    (root / "runner.py").write_text(RUNNER)
    res = subprocess.run(
        [sys.executable, "runner.py", "user", "kill", "ok"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT ") :])
    user, kill, ok = results["user"], results["kill"], results["ok"]
    assert user == {
        "completed": False,
        "message": "lmforge demo: error: data/demo.csv: row 3: label is missing",
        "user_error": True,
        "code": 2,
        "retried": False,
    }
    assert not kill["completed"] and not kill["user_error"] and kill["retried"] and kill["code"] != 2
    assert "ended without a status" in kill["message"] and "an earlier run" not in kill["message"]
    assert ok["completed"] and ok["metrics"]["rows"] == 3
    assert [p.name for p in stale.parent.iterdir()] == [stale.name]  # each attempt's own file is gone
