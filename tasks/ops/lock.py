"""One run at a time per workspace, and never a lock that outlives its holder.

A workspace is a folder on one machine, so the kernel is the exact judge of who holds it: an
exclusive `flock` on `.dvc/tmp/lmforge.lock`, which the kernel releases when the holder exits in any
way (SIGKILL, OOM killer) — nothing can leak. The lock descriptor is handed to the `dvc repro`
processes a run starts (`held_fds`), so the workspace stays held until the last of them has exited:
a rerun after a kill waits for the killed run's stage to stop instead of colliding with DVC's own
repo lock. The holder writes its pid, command and start time into
the file so a waiter can say in one line what it waits for; waiting is bounded.

Everything a run shares with other runs of the workspace is created or migrated under this lock: the MLflow
store (its first use creates and migrates mlflow.db), Prefect's database (`.prefect/prefect.db`, migrated by
the temporary server a flow run starts), BentoML's home and `.dvc/tmp`. So `python -m flows.pipeline` and
`python -m flows.retrain` take it before Prefect or MLflow start, and the flow run inside them finds it held by
its own process: `workspace_lock` is reentrant within a process (a second `open` + `flock` there would be a new
open file description, and wait for itself). A command that only opens the stores beside runs (`lmforge ui`)
waits with `stores_settled` until the run holding the lock says it has created them (`mark_stores_ready`), so
it neither races a first run's migration nor waits for the whole run.
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
from typing import IO, Iterator

from tasks.shared.errors import UserError

LOCK_FILE = Path(".dvc") / "tmp" / "lmforge.lock"
DEFAULT_TIMEOUT = 3600.0
STORES_READY = "stores_ready"
"""Key of the holder's record in the lock file: true once its run has created or migrated the shared stores."""
_held: dict[Path, IO[str]] = {}


def held_fds() -> tuple[int, ...]:
    """Descriptors of the locks this process holds: pass them to children (`pass_fds`) that must hold them too."""
    return tuple(f.fileno() for f in _held.values())


def _lock_path(root: Path | str) -> Path:
    path = (Path(root) / LOCK_FILE).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _record(f: IO[str]) -> dict:
    """What the holder wrote into the lock file ({} while it writes, or if nobody has)."""
    f.seek(0)
    try:
        return json.loads(f.read() or "{}")
    except ValueError:
        return {}


def _write_record(f: IO[str], info: dict) -> None:
    f.seek(0)
    f.truncate()
    f.write(json.dumps(info))
    f.flush()


def _holder(f: IO[str]) -> str:
    info = _record(f)
    if not info:
        return "another lmforge run"
    return f"`{info.get('cmd', '?')}` (pid {info.get('pid', '?')}, started {info.get('started', '?')})"


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _wait(f: IO[str], root: Path | str, timeout: float, poll: float, why: str, done) -> None:
    """Poll until `done()` (which may take the lock), saying once what for; a UserError after `timeout` s."""
    deadline, waited = time.monotonic() + timeout, False
    while not done():
        if time.monotonic() >= deadline:
            raise UserError(
                f"workspace {Path(root).resolve()} is still held by {_holder(f)} after {timeout:.0f} s; try again later"
            )
        if not waited:
            print(
                f"lmforge: waiting up to {timeout:.0f} s for {_holder(f)} {why} {Path(root).resolve()}",
                file=sys.stderr,
                flush=True,
            )
            waited = True
        time.sleep(poll)


@contextmanager
def _holding(path: Path, f: IO[str], what: str) -> Iterator[None]:
    """Record this process as the holder of the lock it just took on `f`, for the duration."""
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    _write_record(f, {"pid": os.getpid(), "cmd": what or " ".join(sys.argv), "started": started})
    _held[path] = f
    try:
        yield
    finally:
        del _held[path]


@contextmanager
def workspace_lock(
    root: Path | str = ".", what: str = "", timeout: float = DEFAULT_TIMEOUT, poll: float = 1.0
) -> Iterator[None]:
    """Hold the workspace lock of `root`; wait at most `timeout` seconds for it, saying once what for.

    Reentrant: in a process that holds it already it only yields."""
    path = _lock_path(root)
    if path in _held:
        yield
        return
    with open(path, "a+") as f:  # the lock goes when the last process holding this descriptor closes it
        _wait(f, root, timeout, poll, "to finish with workspace", lambda: _try_lock(f))
        with _holding(path, f, what):
            yield


def mark_stores_ready(root: Path | str = ".") -> None:
    """Record in the lock this process holds that its run has created or migrated the workspace's shared stores
    (the MLflow store, Prefect's database): `stores_settled` waiters may open them now."""
    f = _held.get(_lock_path(root))
    if f is not None:
        _write_record(f, {**_record(f), STORES_READY: True})


@contextmanager
def stores_settled(
    root: Path | str = ".", what: str = "", timeout: float = DEFAULT_TIMEOUT, poll: float = 1.0
) -> Iterator[bool]:
    """For a command that opens the workspace's stores beside runs (`lmforge ui`): yields True holding the workspace
    lock when no run holds it (create or migrate the stores inside, then leave), or False without it as soon as the
    run that holds it has created them (`mark_stores_ready`). Waiting says once what for and is bounded. Outside a
    DVC workspace (no `.dvc/`) there is no run to wait for: it yields True at once."""
    if not (Path(root) / ".dvc").is_dir():
        yield True
        return
    path = _lock_path(root)
    if path in _held:
        yield True
        return
    with open(path, "a+") as f:
        locked: list[bool] = []

        def settled() -> bool:
            if _try_lock(f):
                locked.append(True)
                return True
            return bool(_record(f).get(STORES_READY))

        _wait(f, root, timeout, poll, "to create the shared stores of workspace", settled)
        if not locked:
            yield False
            return
        with _holding(path, f, what):
            yield True
