"""The workspace lock: released by the kernel however its holder dies, waited for in one line, bounded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.ops.lock import workspace_lock
from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from tasks.ops.lock import workspace_lock
with workspace_lock({ws!r}, "holder under test", timeout=5):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(ws: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(root=str(ROOT), ws=str(ws))], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_a_killed_holder_never_leaves_the_workspace_locked(tmp_path, sig):
    holder = _holder(tmp_path)
    holder.send_signal(sig)
    holder.wait(timeout=10)
    start = time.monotonic()
    with workspace_lock(tmp_path, "next run", timeout=5):
        pass
    assert time.monotonic() - start < 2


def test_waiting_is_said_in_one_line_and_bounded(tmp_path, capsys):
    holder = _holder(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match=r"still held by `holder under test` \(pid \d+, started .*\) after 1 s"):
            with workspace_lock(tmp_path, "waiter", timeout=1.0, poll=0.1):
                pass
        assert time.monotonic() - start < 3
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmforge: waiting up to 1 s for `holder under test` (pid ")
    finally:
        holder.kill()
        holder.wait()


def test_a_waiter_proceeds_when_the_holder_finishes(tmp_path):
    holder = _holder(tmp_path)
    subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
    with workspace_lock(tmp_path, "waiter", timeout=30, poll=0.1):
        assert holder.wait(timeout=5) != 0


def test_the_lock_is_reentrant_across_runs_in_one_process(tmp_path):
    for _ in range(3):
        with workspace_lock(tmp_path, "sequential", timeout=1):
            pass


def test_the_lock_is_reentrant_within_a_process_and_handed_to_children_once(tmp_path):
    """The flow runs inside `python -m flows.pipeline`, which took the lock before Prefect started: the flow's own
    `workspace_lock` must not wait for its process."""
    from tasks.ops.lock import held_fds

    with workspace_lock(tmp_path, "outer", timeout=1):
        with workspace_lock(tmp_path, "inner", timeout=1):
            assert len(held_fds()) == 1
        assert len(held_fds()) == 1
    assert held_fds() == ()


STORES = """
import sys, time
sys.path.insert(0, {root!r})
from tasks.ops.lock import mark_stores_ready, workspace_lock
with workspace_lock({ws!r}, "first run", timeout=5):
    print("held", flush=True)
    time.sleep(1.5)  # creating the stores
    mark_stores_ready({ws!r})
    time.sleep(600)  # the rest of the run
"""


def test_a_ui_waits_for_a_run_to_create_the_stores_not_for_the_whole_run(tmp_path, capsys):
    from tasks.ops.lock import stores_settled

    holder = subprocess.Popen(
        [sys.executable, "-c", STORES.format(root=str(ROOT), ws=str(tmp_path))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with stores_settled(tmp_path, "ui", timeout=30, poll=0.1) as locked:
            waited = time.monotonic() - start
        assert locked is False and 1.0 < waited < 10
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "for `first run` (pid" in err[0] and "to create the shared stores" in err[0]
    finally:
        holder.kill()
        holder.wait()
    with stores_settled(tmp_path, "ui", timeout=5) as locked:  # nobody holds it: create them under the lock
        assert locked is True
