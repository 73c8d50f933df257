"""How a stage is run: its exit codes, its one-line messages, its process environment, which stages
resume, and the status file it writes when it ends.

The stage harness (tasks/shared/harness.py) ends every stage with one of the exit codes below and, when
the process that started it asked for one (STATUS_ENV names a file), writes a small JSON status: the
stage, its exit code and its one-line message. The runner (flows/stages.py) gives each attempt a fresh
file under `.dvc/tmp/` (never a DVC output), reads it after `dvc repro --single-item` exits and removes
it. No status means the stage never reached its end (killed, or DVC failed before or around it): a
crash, worth retrying. A stale status cannot be read by mistake: every attempt has a file of its own.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.shared.io import write_json
from tasks.shared.tracking import PARENT_RUN_ENV

SUCCESS_EXIT = 0
CRASH_EXIT = 1
"""An internal error (a bug, a lost device): the stage printed its traceback."""
USER_ERROR_EXIT = 2
"""Bad params, data or artifacts: one line names what to fix; retrying cannot help."""
TRACKING_EXIT = 3
"""The tracking store failed: not the user's input, and a later rerun (or the flow's retry) can succeed."""
INTERRUPTED_EXIT = 130
"""Ctrl-C, SIGTERM or a lost supervisor: the stage stopped cleanly, no output replaced by a partial one."""

RESUMABLE = {"pretrain": 2}
"""Stages that continue from their last checkpoint, and how many retries the flow gives them (cheap ones)."""

STATUS_ENV = "LMFORGE_STAGE_STATUS"
"""The file a stage writes its StageStatus to when it ends (set by the runner; unset: no status)."""
STATUS_DIR = Path(".dvc") / "tmp" / "lmforge-status"
"""Where the runner puts status files, under the working copy: DVC's own scratch folder, never an output."""


def error_line(stage: str, message: object) -> str:
    """The one-line report of a user error (exit code 2)."""
    return f"lmforge {stage}: error: {message}"


def failure_line(stage: str, message: object) -> str:
    """The one-line report of a failure that is not the input's fault (exit code 3): worth a retry."""
    return f"lmforge {stage}: failed: {message}"


def interrupted_line(stage: str) -> str:
    return f"lmforge {stage}: interrupted; its outputs were not replaced (a rerun starts it again)"


def crash_line(stage: str, e: BaseException) -> str:
    """The first line of an internal error (its traceback goes to stderr as usual)."""
    first = (str(e).splitlines() or [""])[0][:300]
    return f"lmforge {stage}: crashed: {type(e).__name__}" + (f": {first}" if first else "")


@dataclass(frozen=True)
class StageStatus:
    """How a stage ended, written by the stage itself."""

    stage: str
    exit_code: int
    message: str = ""
    """The one-line report (empty on success)."""

    @property
    def user_error(self) -> bool:
        return self.exit_code == USER_ERROR_EXIT


def write_status(status: StageStatus, path: Path | str | None = None) -> None:
    """Write `status` atomically to `path` (default: the file STATUS_ENV names; nothing if none is named)."""
    path = path or os.environ.get(STATUS_ENV)
    if path:
        write_json(path, asdict(status))


def take_status(path: Path | str) -> StageStatus | None:
    """The status at `path`, removing the file (None if the stage wrote none, or an unreadable one)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return StageStatus(str(data["stage"]), int(data["exit_code"]), str(data.get("message") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        path.unlink(missing_ok=True)


def new_status_file(stage: str, root: Path | str = ".") -> Path:
    """A status file of its own for one attempt of `stage` (not created: the stage writes it)."""
    folder = Path(root) / STATUS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{stage}-{uuid.uuid4().hex}.json"


def stage_env(parent_run_id: str) -> dict[str, str]:
    """The environment of a stage process: nested under the parent MLflow run, this interpreter first on PATH."""
    env = {**os.environ, PARENT_RUN_ENV: parent_run_id, "TQDM_MININTERVAL": "5", "PYTHONUNBUFFERED": "1"}
    # dvc.yaml's `python -m tasks.<stage>` must find this interpreter even when the venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env
