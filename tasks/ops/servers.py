"""A Prefect server on loopback for commands that need one (`lmforge schedule`, `lmforge ui --prefect`) when
PREFECT_API_URL is unset.

Prefect's temporary (ephemeral) server runs no scheduler and goes with the run that started it: `flow.serve` on
it refuses to schedule, and nothing is left to browse. So a schedule or a UI without a team server gets a real
`prefect server start` on 127.0.0.1, with its database in PREFECT_HOME (`.prefect/` under make: where every
`lmforge pipeline` records its flow and task runs), stopped with the command. Its UI shows those runs. The server
migrates that database when it starts, so it starts once no run of the workspace is creating it
(tasks/ops/lock.py: `stores_settled`).
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

from tasks.ops.lock import stores_settled
from tasks.shared.errors import UserError


def healthy(url: str, timeout: float = 3) -> bool:
    """Whether `url`/health answers 200: a Prefect API URL (`…/api`) or an MLflow tracking server."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def ui_url(api_url: str) -> str:
    """The Prefect UI's address for the server whose API is at `api_url` (the UI is served above `/api`)."""
    return api_url.rstrip("/").removesuffix("/api") + "/"


@contextmanager
def local_prefect_server(port: int = 4200, startup_timeout: float = 180) -> Iterator[str]:
    """PREFECT_API_URL if set; else a `prefect server start` on 127.0.0.1:`port` for the duration
    (or the one already answering there)."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    url = f"http://127.0.0.1:{port}/api"
    if healthy(url):
        print(f"lmforge: using the Prefect server already answering on {url}", file=sys.stderr, flush=True)
        yield url
        return
    with stores_settled(Path.cwd(), f"prefect server start on port {port} (migrating its database)"):
        proc = _start_server(port, startup_timeout)
    try:
        yield url
    finally:
        stop_group(proc, grace=30)


def _start_server(port: int, startup_timeout: float) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` in a session of its own, once it answers; a UserError if not."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    log, url = home / "server.log", f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    # The UI's pages call the API at PREFECT_SERVER_UI_API_URL, which defaults to port 4200 whatever --port says.
    ui_api = (
        {}
        if {"PREFECT_SERVER_UI_API_URL", "PREFECT_UI_API_URL"} & set(os.environ)
        else {"PREFECT_SERVER_UI_API_URL": url}
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **ui_api}
        )
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
    except BaseException:
        stop_group(proc, grace=30)
        raise
    print(
        f"lmforge: Prefect server on http://127.0.0.1:{port} (UI; database in {home}, log {log})",
        file=sys.stderr,
        flush=True,
    )
    return proc


def serve_until_stopped(url: str, poll: float = 5.0) -> None:
    """Block while the server at `url` answers (Ctrl-C or SIGTERM ends it: KeyboardInterrupt); a UserError
    when it stops answering on its own."""
    while healthy(url, timeout=10):
        time.sleep(poll)
    raise UserError(f"the Prefect server on {url} stopped answering")


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
