"""One run at a time per workspace, and never a lock that outlives its holder.

A workspace is a folder on one machine, so the kernel is the exact judge of who holds it: an
exclusive `flock` on `.dvc/tmp/lmforge.lock`, which the kernel releases when the holder exits in any
way (SIGKILL, OOM killer) — nothing can leak. The lock descriptor is handed to the `dvc repro`
processes a run starts (`held_fds`), so the workspace stays held until the last of them has exited:
a rerun after a kill waits for the killed run's stage to stop instead of colliding with DVC's own
repo lock. The holder writes its pid, command and start time into
the file so a waiter can say in one line what it waits for; waiting is bounded.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from tasks.shared.errors import UserError

LOCK_FILE = Path(".dvc") / "tmp" / "lmforge.lock"
DEFAULT_TIMEOUT = 3600.0
_held: list[int] = []


def held_fds() -> tuple[int, ...]:
    """Descriptors of the locks this process holds: pass them to children (`pass_fds`) that must hold them too."""
    return tuple(_held)


def _holder(f) -> str:
    f.seek(0)
    try:
        info = json.loads(f.read() or "{}")
    except ValueError:
        info = {}
    if not info:
        return "another lmforge run"
    return f"`{info.get('cmd', '?')}` (pid {info.get('pid', '?')}, started {info.get('started', '?')})"


@contextmanager
def workspace_lock(
    root: Path | str = ".", what: str = "", timeout: float = DEFAULT_TIMEOUT, poll: float = 1.0
) -> Iterator[None]:
    """Hold the workspace lock of `root`; wait at most `timeout` seconds for it, saying once what for."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"workspace {Path(root).resolve()} is still held by {_holder(f)} after {timeout:.0f} s; "
                        "try again later"
                    ) from None
                if not waited:
                    print(
                        f"lmforge: waiting up to {timeout:.0f} s for {_holder(f)} "
                        f"to finish with workspace {Path(root).resolve()}",
                        file=sys.stderr,
                        flush=True,
                    )
                    waited = True
                time.sleep(poll)
        f.seek(0)
        f.truncate()
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        f.write(json.dumps({"pid": os.getpid(), "cmd": what or " ".join(sys.argv), "started": started}))
        f.flush()
        _held.append(f.fileno())
        try:
            yield
        finally:
            _held.remove(f.fileno())
    finally:
        f.close()  # the lock goes when the last process holding this descriptor closes it
