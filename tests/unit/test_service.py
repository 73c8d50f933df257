"""The service with no usable model: one-line reasons from `check_model`, 503s instead of a crash loop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import LABELS, ROOT, free_port
from deploy.service import MODEL_URI_ENV, LMForge, ModelUnavailable, check_model, load_service_bundle
from models.bundle import write_bundle
from models.tokenizer import TOKENIZER_FILE

NAME = "lmforge-classifier"  # params.yaml's tracking.registered_model


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.fixture(scope="module")
def bundles(tiny_pipeline, tmp_path_factory) -> Path:
    """`good/`, `truncated/` (classifier weights cut in half) and `empty/` folders."""
    p, root = tiny_pipeline.paths, tmp_path_factory.mktemp("bundles")
    write_bundle(root / "good", p.tokenizer / TOKENIZER_FILE, p.classifier, p.lm)
    shutil.copytree(root / "good", root / "truncated")
    truncate(root / "truncated" / "classifier" / "model.safetensors")
    (root / "empty").mkdir()
    return root


@pytest.fixture(scope="module")
def registry(bundles, tmp_path_factory) -> str:
    """An MLflow store: `lmforge-classifier` with a version but no @champion, `broken@champion` (a truncated
    bundle) and `served@champion` (a good one), laid out as `lmforge promote` logs them."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name, bundle, alias in ((NAME, "good", None), ("broken", "truncated", "champion"), ("served", "good", "champion")):
        source = root / name
        shutil.copytree(bundles / bundle, source / "artifacts" / "bundle")
        client.create_registered_model(name)
        version = client.create_model_version(name, source=str(source)).version
        if alias:
            client.set_registered_model_alias(name, alias, version)
    return uri


@pytest.fixture(autouse=True)
def no_model_uri(monkeypatch):
    """Every test says which model it means; the default URI comes from the project's params.yaml."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(MODEL_URI_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def unavailable(case: str, bundles: Path, registry: str, tmp_path: Path, monkeypatch) -> tuple[str | None, str]:
    """Set up `case`; returns the URI argument for check_model (None: resolved as the service does) and the
    message expected."""
    missing_store = f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}"
    cases = {
        "env-no-folder": (None, {MODEL_URI_ENV: "/nonexistent/bundle"}, "LMFORGE_MODEL_URI=/nonexistent/bundle: no such folder or model URI"),
        "arg-no-folder": (str(tmp_path / "nope"), {}, f"{tmp_path / 'nope'}: no such folder or model URI"),
        "truncated-bundle": (None, {MODEL_URI_ENV: str(bundles / "truncated")}, f"LMFORGE_MODEL_URI={bundles / 'truncated'}: classifier/model.safetensors: truncated ("),
        "not-a-bundle": (str(bundles / "empty"), {}, f"{bundles / 'empty'}: classifier/config.json: model config not found"),
        "no-store": (None, {"MLFLOW_TRACKING_URI": missing_store}, f"no registered model '{NAME}' in {missing_store} (no MLflow store yet): run `make pipeline` first"),
        "no-registered-model": ("models:/other@champion", {"MLFLOW_TRACKING_URI": registry}, f"no registered model 'other' in {registry}: run `make pipeline` first"),
        "no-champion": (None, {"MLFLOW_TRACKING_URI": registry}, f"models:/{NAME}@champion: alias champion not set (no version passed the gates yet)"),
        "no-version": (f"models:/{NAME}/7", {"MLFLOW_TRACKING_URI": registry}, f"models:/{NAME}/7: no version 7 of '{NAME}' in {registry}"),
        "truncated-champion": ("models:/broken@champion", {"MLFLOW_TRACKING_URI": registry}, "models:/broken@champion: artifacts/bundle/classifier/model.safetensors: truncated ("),
        "bad-uri": (None, {MODEL_URI_ENV: "runs:/0123abc/model", "MLFLOW_TRACKING_URI": registry}, "LMFORGE_MODEL_URI=runs:/0123abc/model: Run with id=0123abc not found"),
    }
    uri, env, message = cases[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return uri, message


CASES = ["env-no-folder", "arg-no-folder", "truncated-bundle", "not-a-bundle", "no-store", "no-registered-model", "no-champion", "no-version", "truncated-champion", "bad-uri"]


@pytest.mark.parametrize("case", CASES)
def test_check_model_names_what_is_wrong_in_one_line(case, bundles, registry, tmp_path, monkeypatch):
    uri, message = unavailable(case, bundles, registry, tmp_path, monkeypatch)
    with pytest.raises(ModelUnavailable) as e:
        check_model(uri)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "none").exists()  # looking for a store never creates one


@pytest.mark.parametrize("uri", ["good", "models:/served@champion"])
def test_check_model_describes_a_loadable_model(uri, bundles, registry, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry)
    uri = str(bundles / uri) if uri == "good" else uri
    assert check_model(uri) == f"{uri}: fp32 classifier over {len(LABELS)} labels, with /generate"
    monkeypatch.setenv(MODEL_URI_ENV, uri)
    assert check_model().startswith(f"{uri}: ")
    assert load_service_bundle(uri).labels == LABELS


# --- the service in-process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app():
    """The service as an ASGI app, built once (BentoML registers its metrics once per process); each
    `TestClient` block starts a fresh service instance that reads the environment again."""
    return LMForge.to_asgi()


def client(app):
    from starlette.testclient import TestClient

    return TestClient(app)


@pytest.mark.parametrize("case", ["env-no-folder", "truncated-bundle", "no-store", "no-champion"])
def test_service_without_a_model_stays_up_and_answers_503_with_the_reason(app, case, bundles, registry, tmp_path, monkeypatch, caplog):
    uri, message = unavailable(case, bundles, registry, tmp_path, monkeypatch)
    if uri is not None:
        monkeypatch.setenv(MODEL_URI_ENV, uri)
        message = f"LMFORGE_MODEL_URI={message}" if message.startswith(uri) else message
    with client(app) as c:
        assert c.get("/livez").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.text.startswith(f"model unavailable: {message}")
        for path, body in (("/classify", {"texts": ["def f(): pass"]}), ("/generate", {"prompt": "def f("})):
            r = c.post(path, json=body)
            assert r.status_code == 503 and r.json()["error"].startswith(f"model unavailable: {message}")
    logged = [r for r in caplog.records if "no model to serve" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is None  # one line, no traceback


def test_service_with_a_model_is_ready(app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        assert c.get("/readyz").status_code == 200
        r = c.post("/classify", json={"texts": ["def f(): pass", "x"]})
        assert r.status_code == 200 and [p["label"] in LABELS for p in r.json()] == [True, True]


# --- a real `bentoml serve` ----------------------------------------------------------------------


def request(url: str, body: bytes | None = None) -> tuple[int, str]:
    """(status, body) of a GET, or of a JSON POST when `body` is given."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def stop(proc: subprocess.Popen) -> None:
    """Stop the server and its worker (BentoML starts the worker in a session of its own)."""
    import psutil

    groups = {os.getpgid(p.pid) for p in psutil.Process(proc.pid).children(recursive=True) if p.is_running()}
    for pgid in {proc.pid, *groups}:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["/nonexistent/bundle", "truncated"])
def test_bentoml_serve_without_a_model_does_not_crash_loop(model, bundles, tmp_path):
    uri = str(bundles / model) if model == "truncated" else model
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, MODEL_URI_ENV: uri, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    bentoml = Path(sys.executable).parent / "bentoml"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(bentoml), "serve", "deploy.service:LMForge", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while "no model to serve" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        status, reason = request(f"{base}/readyz")
        assert status == 503 and reason.startswith(f"model unavailable: LMFORGE_MODEL_URI={uri}: "), (status, reason, log.read_text())
        status, body = request(f"{base}/classify", b'{"texts": ["def f(): pass"]}')
        assert status == 503 and f"LMFORGE_MODEL_URI={uri}: " in body
        time.sleep(5)  # a crash-looping worker would have restarted and logged again by now
        assert proc.poll() is None
        text = log.read_text()
        assert text.count("no model to serve") == 1 and text.count("Service lmforge initialized") == 1, text
        assert "Traceback" not in text, text
    finally:
        stop(proc)
