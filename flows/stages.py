"""The Prefect task that runs one DVC stage here, and how its outcome becomes a task state.

`run_stage` runs `dvc repro --single-item <stage>` in a process group of its own, streams its output
into the Prefect logs and, when it exits, reads the status the stage wrote (tasks/shared/stagerun.py)
to learn how the stage ended: a user error (exit code 2) ends the task Failed with the stage's one-line
message and is not retried; any other failure raises StageFailed, which the retry policy may retry.
Both the pipeline flow (flows/pipeline.py) and a worker running a placed stage (flows/placement.py)
use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

from prefect import get_run_logger, task
from prefect.states import Failed, State

from tasks.ops.lock import held_fds
from tasks.shared import lifeline
from tasks.shared.errors import UserError
from tasks.shared.stagerun import STATUS_ENV, USER_ERROR_EXIT, StageStatus, new_status_file, take_status

USER_ERROR_STATE = "UserError"
"""The name of a Failed state that carries a user's one-line error (bad params or data): never retried,
shown without a traceback. A state name is Prefect's own field, so a placed stage's caller reads it too."""


class StageFailed(RuntimeError):
    """A DVC stage failed for a reason other than its input; `returncode` is the stage's exit code."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def user_error(message: str) -> State:
    """The Failed state of a user error: its one-line message, exit code 2."""
    return Failed(message=message, data=USER_ERROR_EXIT, name=USER_ERROR_STATE)


def is_user_error(state: State) -> bool:
    return state.is_failed() and state.name == USER_ERROR_STATE


def exit_code(state: State) -> int:
    """The exit code a final state stands for (2 for a user error, the stage's own code, else 1)."""
    if is_user_error(state):
        return USER_ERROR_EXIT
    exc = state.result(raise_on_failure=False)
    return exc if isinstance(exc, int) else getattr(exc, "returncode", 1)


def worth_retrying(task, task_run, state) -> bool:
    """Retry crashes (killed worker, lost device, lost tracking store), not bad input."""
    if state.name == USER_ERROR_STATE:
        return False
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, UserError) or (isinstance(exc, int) and exc == USER_ERROR_EXIT):
        return False
    return not (isinstance(exc, StageFailed) and exc.returncode == USER_ERROR_EXIT)


@task(task_run_name="{stage}", retries=0, retry_condition_fn=worth_retrying)
def run_stage(stage: str, env: dict[str, str]) -> dict:
    """`dvc repro --single-item <stage>`, streaming its output into the Prefect logs; the stage's metrics.

    A user error ends the task Failed with the stage's one-line message; any other failure raises
    StageFailed, which the retry policy may retry.
    """
    from tasks.ops.dag import dvc_command

    status_file = new_status_file(stage)  # a fresh one per attempt: no earlier run's status can be read
    proc = subprocess.Popen(
        dvc_command("repro", "--quiet", "--single-item", stage),
        env={**env, lifeline.SUPERVISOR_ENV: str(os.getpid()), STATUS_ENV: str(status_file.resolve())},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # Ctrl-C reaches the flow, which stops the whole stage (below)
        pass_fds=held_fds(),  # the workspace stays locked until this dvc process has exited
    )
    try:
        last = _stream(proc, get_run_logger())
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the stage before anything else
        lifeline.terminate_group(proc)
        take_status(status_file)
        raise
    status = take_status(status_file)
    if proc.returncode != 0:
        return _failed(stage, status, proc.returncode, last)
    from tasks.shared.config.params import load_params

    metrics = Path(load_params().paths.metrics) / f"{stage}.json"
    return json.loads(metrics.read_text()) if metrics.exists() else {}


def _stream(proc: subprocess.Popen, logger) -> str:
    """Log the process's output line by line until it exits; returns the last line."""
    last = ""
    assert proc.stdout is not None
    for chunk in proc.stdout:
        for line in re.split(r"[\r\n]", chunk):
            line = line.rstrip()
            if line and line != last:  # progress bars redraw the same line
                logger.info(line)
                last = line
    proc.wait()
    return last


def _failed(stage: str, status: StageStatus | None, returncode: int, last: str) -> State:
    """The task's outcome when `dvc repro` failed, decided by the stage's own status."""
    if status is not None and status.user_error:
        return user_error(status.message)
    if status is not None and status.exit_code != 0:
        raise StageFailed(status.message, status.exit_code)
    if status is None:  # killed before it could say, or DVC failed before running it
        why = "ended without a status (killed, or dvc failed before it ran)"
    else:  # the stage finished; DVC failed to record it
        why = "finished, but dvc failed to record it"
    raise StageFailed(f"stage {stage!r} {why}; dvc repro exit code {returncode}: {last}", returncode)


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a task that returned a Failed state with `exc_info` but no exception, which prints
    a stray `NoneType: None`; a user error has no traceback to show, and neither has a failed stage
    (its own output, already in the log, says why; the flow's frames would not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.exc_info[0] is None or issubclass(record.exc_info[0], (StageFailed, UserError))):
            record.exc_info = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoEmptyTraceback())
logging.getLogger("prefect.flow_runs").addFilter(_NoEmptyTraceback())
