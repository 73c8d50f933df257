"""Process lifetimes: a killed driver never leaves its children running.

A child learns that whoever started it is gone by polling (a SIGKILL runs no cleanup in the dead
process, so the survivors must notice by themselves): its parent process changed (it was re-parented
after its parent died), or the supervisor named in LMFORGE_SUPERVISOR_PID no longer exists. The
stage harness stops the stage then (SIGTERM to itself: the stage unwinds, its atomic writers leave
nothing half-written); the flow process kills its whole process group, Prefect's server included.

SIGTERM is turned into KeyboardInterrupt so that Ctrl-C, `kill` and a lost parent all take the same
path: finally-blocks run, and the entry point prints one line instead of a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

SUPERVISOR_ENV = "LMFORGE_SUPERVISOR_PID"
POLL_SECONDS = 0.5


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def watch(on_lost: Callable[[str], None], interval: float = POLL_SECONDS) -> threading.Thread:
    """Call `on_lost(reason)` once (from a daemon thread) when this process's parent or supervisor dies."""
    parent = os.getppid()
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0") or 0)

    def loop() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                return on_lost(f"parent process {parent} exited")
            if supervisor and not pid_alive(supervisor):
                return on_lost(f"supervisor process {supervisor} exited")

    thread = threading.Thread(target=loop, name="lmforge-lifeline", daemon=True)
    thread.start()
    return thread


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, like Ctrl-C (a no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def stop_self(grace: float = 10.0) -> Callable[[str], None]:
    """An `on_lost` for a stage: SIGTERM to this process, then a hard exit if it has not unwound in `grace` s."""

    def stop(reason: str) -> None:
        print(f"lmforge: {reason}; stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(137)

    return stop


def stop_group(reason: str) -> None:
    """An `on_lost` for a process-group leader: kill the whole group (itself included) at once."""
    print(f"lmforge: {reason}; stopping this run and its processes", flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is in group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: zombies count as alive
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in "ZX" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def terminate_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop the process group `proc` leads (started with start_new_session=True): SIGTERM, then SIGKILL
    whatever is left after `grace` seconds."""
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_alive(proc.pid) and time.monotonic() < deadline:
        proc.poll()  # reap the leader so that only live members keep the group alive
        time.sleep(0.1)
    if group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5  # SIGKILL is not instantaneous
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
