"""A Prefect server on loopback for commands that need one (`lmforge schedule`) when PREFECT_API_URL is unset.

Prefect's temporary (ephemeral) server runs no scheduler: `flow.serve` on it refuses to schedule. So a
schedule without a team server gets a real `prefect server start` on 127.0.0.1, with its database in
PREFECT_HOME (`.prefect/` under make), stopped with the command. Its UI shows the scheduled runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tasks.shared.errors import UserError


def healthy(url: str, timeout: float = 3) -> bool:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def local_prefect_server(port: int = 4200, startup_timeout: float = 180) -> Iterator[str]:
    """PREFECT_API_URL if set; else a `prefect server start` on 127.0.0.1:`port` for the duration
    (or the one already answering there)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        print(f"lmforge: using the Prefect server already answering on {url}", file=sys.stderr, flush=True)
        yield url
        return
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not healthy(url):
            if proc.poll() is not None:
                raise UserError(
                    f"prefect server start exited with code {proc.returncode} (port {port} in use? see {log}); "
                    "pass --port or set PREFECT_API_URL"
                )
            if time.monotonic() > deadline:
                raise UserError(
                    f"the Prefect server on {url} did not answer within {startup_timeout:.0f} s (see {log})"
                )
            time.sleep(0.5)
        print(
            f"lmforge: Prefect server on http://127.0.0.1:{port} (UI; database in {home}, log {log})",
            file=sys.stderr,
            flush=True,
        )
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def stop_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM to the process group of `proc` (started with `start_new_session=True`), SIGKILL after `grace` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
