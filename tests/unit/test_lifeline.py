"""Children stop when whoever started them dies; process groups are stopped whole."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.shared import lifeline

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from tasks.shared import lifeline
lifeline.interrupt_on_sigterm()
lifeline.watch(lifeline.stop_self(grace=5), interval=0.1)
try:
    print("child", flush=True)
    time.sleep(600)
except KeyboardInterrupt:
    open({marker!r}, "w").write("unwound")
"""


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not lifeline.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_child_unwinds_when_its_supervisor_dies(tmp_path):
    supervisor = subprocess.Popen(["sleep", "600"])
    marker = tmp_path / "marker"
    env = {**os.environ, lifeline.SUPERVISOR_ENV: str(supervisor.pid)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), marker=str(marker))],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "child"
    supervisor.kill()
    supervisor.wait()
    assert child.wait(timeout=10) == 0  # it left through its except block: finally-blocks ran
    assert marker.read_text() == "unwound"
    assert "supervisor process" in child.stdout.read()


def test_a_child_unwinds_when_its_parent_dies(tmp_path):
    marker = tmp_path / "marker"
    (tmp_path / "child.py").write_text(CHILD.format(root=str(ROOT), marker=str(marker)))
    # sh starts the child in the background and is killed: the child is re-parented
    sh = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} {tmp_path / 'child.py'} & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    pid = int(sh.stdout.readline())
    assert sh.stdout.readline().strip() == "child"
    sh.kill()
    sh.wait()
    assert _wait_gone(pid, 10)
    assert marker.read_text() == "unwound"


@pytest.mark.parametrize("trap", ["", "trap '' TERM; "])  # a member that ignores SIGTERM is killed after the grace
def test_terminate_group_stops_every_member(trap):
    proc = subprocess.Popen(
        ["sh", "-c", f"{trap}sleep 600 & sleep 600 & echo ready; wait"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    lifeline.terminate_group(proc, grace=1.0)
    assert not lifeline.group_alive(proc.pid)
    assert time.monotonic() - start < 8
