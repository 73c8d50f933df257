"""Run a command as a supervised process group: Ctrl-C stops all of it within seconds, quietly.

`lmforge pipeline` runs the flow (`python -m flows.pipeline`) in a session of its own, so the
terminal's Ctrl-C does not hit Prefect's temporary server, DVC and the stage all at once. This
process forwards the first Ctrl-C (or SIGTERM/SIGHUP) to the flow as SIGTERM — the flow stops its
stage, records the interruption in Prefect and MLflow and exits — and kills the whole group if that
takes longer than `grace` seconds or on a second Ctrl-C. If this process itself is killed, the flow
notices and takes its group down (tasks/shared/lifeline.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tasks.shared.lifeline import group_alive
from tasks.shared.stagerun import INTERRUPTED_EXIT

GRACE_SECONDS = 20.0


def run(cmd: list[str], grace: float = GRACE_SECONDS, env: dict[str, str] | None = None) -> int:
    """Run `cmd` in a new session; returns its exit code (130 when interrupted)."""
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    interrupted = []

    def forward(signum, frame):
        if interrupted:  # a second Ctrl-C: no more waiting
            _kill_group(proc.pid)
            return
        interrupted.append(signum)
        print(f"\nlmforge: stopping (signal {signum}); Ctrl-C again to kill at once", file=sys.stderr, flush=True)
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    handlers = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            try:
                code = proc.wait(timeout=grace if interrupted else None)
                break
            except subprocess.TimeoutExpired:
                print(
                    f"lmforge: still running {grace:.0f} s after the interrupt; killing it", file=sys.stderr, flush=True
                )
                _kill_group(proc.pid)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if group_alive(proc.pid):  # whatever the flow left behind in its group
        _kill_group(proc.pid)
    if interrupted and code != 0:
        return INTERRUPTED_EXIT
    if code < 0:  # killed from outside (OOM killer, kill -9)
        print(
            f"lmforge: the run was killed by signal {-code}; its processes were stopped, "
            "a rerun continues from the finished stages",
            file=sys.stderr,
        )
        return 128 - code
    return code


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
