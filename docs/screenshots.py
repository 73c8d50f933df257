"""The MLflow compare view of evaluate's latest child runs as a PNG: docs/img/mlflow-compare.png.

    .venv/bin/python docs/screenshots.py [--params params.yaml] [--out docs/img/mlflow-compare.png]

Run it from the repository root after a pipeline (or `python -m tasks.evaluate`). It starts `mlflow ui` on the
workspace's tracking store (params.yaml's `tracking`, or MLFLOW_TRACKING_URI) on a free loopback port, finds the
newest evaluate run and its child runs (one per model), opens their compare view in headless Chromium (Debian's
`chromium`: `apt-get install -y chromium`), chooses the *Scatter Plot* tab with `p50_ms_b32` on the x axis and
`macro_f1` on the y axis (the Pareto front of quality against latency, one point per model), and saves the page.
The view keeps no tab or axes in its URL, so Chromium is driven over its DevTools protocol (the `websockets` client
Prefect installs) instead of `--screenshot`. Both processes are stopped, by process id, however it ends.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tasks.shared.config.params import load_params
from tasks.shared.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]

X_AXIS, Y_AXIS = "p50_ms_b32", "macro_f1"
WINDOW = (1600, 1200)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
]


CLOSE_SIDE_PANEL = (
    "[...document.querySelectorAll('button[aria-label]')]"
    ".filter(b => /close/i.test(b.getAttribute('aria-label')) && b.getBoundingClientRect().x > 1000)"
    ".forEach(b => b.click())"
)
"""JavaScript: close the assistant side panel MLflow 3 opens on the right, if there is one (it hides a quarter of
the view)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Until `url` answers 200 (a started server), or RuntimeError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def latest_models(uri: str, experiment: str) -> tuple[str, list[str]]:
    """The experiment id and the run ids of the newest evaluate run's child runs."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        sys.exit(f"screenshots: no experiment {experiment!r} in {uri}: run the pipeline first")
    runs = client.search_runs(
        [exp.experiment_id], "tags.`lmforge.stage` = 'evaluate'", order_by=["attributes.start_time DESC"]
    )
    for run in runs:
        children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        if children:
            return exp.experiment_id, [c.info.run_id for c in children]
    sys.exit(f"screenshots: no evaluate run with child runs in {uri}: run `python -m tasks.evaluate` first")


class Page:
    """One Chromium tab over the DevTools protocol: evaluate JavaScript, click, capture."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def value(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.value(expression)
            if found:
                return found
            time.sleep(0.5)
        raise RuntimeError(f"the page never showed {what}")

    def click(self, expression: str, what: str) -> None:
        """A real mouse click at the centre of the element `expression` finds (the page's selects open on pointer
        events, not on element.click())."""
        box = self.wait_for(
            f"(() => {{ const e = {expression}; if (!e) return null; e.scrollIntoView({{block: 'center'}}); "
            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()",
            what,
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        time.sleep(0.5)

    def close(self) -> None:
        self.ws.close()


def by_text(selector: str, text: str) -> str:
    """JavaScript: the first element matching `selector` whose text is `text`."""
    return (
        f"[...document.querySelectorAll({json.dumps(selector)})].find(e => e.textContent.trim() === {json.dumps(text)})"
    )


def choose_axis(page: Page, axis: str, metric: str) -> None:
    page.click(f"document.getElementById('{axis}-axis-selector')", f"the {axis} axis selector")
    page.click(by_text("[role=option]", metric), f"metric {metric} in the {axis} axis list")


def shoot(url: str, out: Path, chromium: str) -> None:
    """Open `url`, pick the scatter plot of Y_AXIS against X_AXIS and save the viewport as PNG to `out`."""
    profile = Path(tempfile.mkdtemp(prefix="lmforge-chromium-"))
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
    browser = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        port = int(port_file.read_text().splitlines()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        try:
            page.call(
                "Emulation.setDeviceMetricsOverride",
                width=WINDOW[0],
                height=WINDOW[1],
                deviceScaleFactor=1,
                mobile=False,
            )
            page.call("Page.navigate", url=url)
            page.click(by_text("[role=tab]", "Scatter Plot"), "the Scatter Plot tab")
            choose_axis(page, "x", X_AXIS)
            choose_axis(page, "y", Y_AXIS)
            page.wait_for(
                "document.querySelectorAll('.js-plotly-plot .scatterlayer, .js-plotly-plot canvas').length", "the chart"
            )
            page.value(f"{by_text('[role=tab]', 'Scatter Plot')}.scrollIntoView({{block: 'start'}})")
            page.value(CLOSE_SIDE_PANEL)
            time.sleep(2)  # plotly draws the points after the axes
            png = page.call("Page.captureScreenshot", format="png")["data"]
        finally:
            page.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(png))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "mlflow-compare.png")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("screenshots: no chromium on PATH (Debian: apt-get install -y chromium)")
    tracking = load_params(args.params).tracking
    uri = tracking_uri(tracking)
    experiment, runs = latest_models(uri, tracking.experiment)
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/health")
        query = urllib.parse.urlencode({"runs": json.dumps(runs), "experiments": json.dumps([experiment])})
        shoot(f"{base}/#/compare-runs?{query}", args.out, chromium)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    print(f"{args.out}: compare view of {len(runs)} child runs of evaluate ({Y_AXIS} against {X_AXIS})")


if __name__ == "__main__":
    main()
