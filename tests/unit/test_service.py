"""The service with no usable model: one-line reasons from `check_model`, 503s instead of a crash loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import LABELS, ROOT, free_port, stop_server

from deploy.resolve import MODEL_URI_ENV, ModelUnavailable, load_service_bundle
from deploy.service import LMForge, check_model
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
    for name, bundle, alias in (
        (NAME, "good", None),
        ("broken", "truncated", "champion"),
        ("served", "good", "champion"),
    ):
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
        "env-no-folder": (
            None,
            {MODEL_URI_ENV: "/nonexistent/bundle"},
            "LMFORGE_MODEL_URI=/nonexistent/bundle: no such folder or model URI",
        ),
        "arg-no-folder": (str(tmp_path / "nope"), {}, f"{tmp_path / 'nope'}: no such folder or model URI"),
        "truncated-bundle": (
            None,
            {MODEL_URI_ENV: str(bundles / "truncated")},
            f"LMFORGE_MODEL_URI={bundles / 'truncated'}: classifier/model.safetensors: truncated (",
        ),
        "not-a-bundle": (
            str(bundles / "empty"),
            {},
            f"{bundles / 'empty'}: classifier/config.json: model config not found",
        ),
        "no-store": (
            None,
            {"MLFLOW_TRACKING_URI": missing_store},
            f"no registered model '{NAME}' in {missing_store} (no MLflow store yet): run `make pipeline` first",
        ),
        "no-registered-model": (
            "models:/other@champion",
            {"MLFLOW_TRACKING_URI": registry},
            f"no registered model 'other' in {registry}: run `make pipeline` first",
        ),
        "no-champion": (
            None,
            {"MLFLOW_TRACKING_URI": registry},
            f"models:/{NAME}@champion: alias champion not set (no version passed the gates yet)",
        ),
        "no-version": (
            f"models:/{NAME}/7",
            {"MLFLOW_TRACKING_URI": registry},
            f"models:/{NAME}/7: no version 7 of '{NAME}' in {registry}",
        ),
        "truncated-champion": (
            "models:/broken@champion",
            {"MLFLOW_TRACKING_URI": registry},
            "models:/broken@champion: artifacts/bundle/classifier/model.safetensors: truncated (",
        ),
        "bad-uri": (
            None,
            {MODEL_URI_ENV: "runs:/0123abc/model", "MLFLOW_TRACKING_URI": registry},
            "LMFORGE_MODEL_URI=runs:/0123abc/model: Run with id=0123abc not found",
        ),
    }
    uri, env, message = cases[case]
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return uri, message


CASES = [
    "env-no-folder",
    "arg-no-folder",
    "truncated-bundle",
    "not-a-bundle",
    "no-store",
    "no-registered-model",
    "no-champion",
    "no-version",
    "truncated-champion",
    "bad-uri",
]


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
    uri, version = (str(bundles / uri), "") if uri == "good" else (uri, " (served/1)")
    assert check_model(uri) == f"{uri}{version}: fp32 classifier over {len(LABELS)} labels, with /generate"
    monkeypatch.setenv(MODEL_URI_ENV, uri)
    assert check_model().startswith(f"{uri}{version}: ")
    assert load_service_bundle(uri).labels == LABELS


# --- the service in-process ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def app():
    """The service as an ASGI app, built once (BentoML registers its metrics once per process); each
    `TestClient` block starts a fresh service instance that reads the environment again."""
    return LMForge.to_asgi()


def client(app):
    """A TestClient (a new event loop): BentoML's adaptive-batching dispatcher binds itself to the loop of its
    first request, so it is unbound first (in a served app there is one loop per worker, forever)."""
    import gc
    import warnings

    from bentoml._internal.marshal.dispatcher import CorkDispatcher
    from starlette.testclient import TestClient

    with warnings.catch_warnings():  # touching every object wakes deprecation warnings (torch's)
        warnings.simplefilter("ignore")
        dispatchers = [o for o in gc.get_objects() if _is_instance(o, CorkDispatcher)]
    for d in dispatchers:
        d.__dict__.pop("_loop", None)
        d.__dict__.pop("_wake_event", None)
        d._controller = None
    return TestClient(app)


def _is_instance(o: object, cls: type) -> bool:
    try:
        return isinstance(o, cls)
    except ReferenceError:  # a weak proxy whose object is gone (another module's, in the same worker)
        return False


@pytest.mark.parametrize("case", ["env-no-folder", "truncated-bundle", "no-store", "no-champion"])
def test_service_without_a_model_stays_up_and_answers_503_with_the_reason(
    app, case, bundles, registry, tmp_path, monkeypatch, caplog
):
    uri, message = unavailable(case, bundles, registry, tmp_path, monkeypatch)
    if uri is not None:
        monkeypatch.setenv(MODEL_URI_ENV, uri)
        message = f"LMFORGE_MODEL_URI={message}" if message.startswith(uri) else message
    with client(app) as c:
        assert c.get("/livez").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.text.startswith(f"model unavailable: {message}")
        for path, body in (("/classify", {"texts": ["def f(): pass"]}), ("/generate", {"prompt": "def f("})):
            r = c.post(
                path, content=json.dumps(body), headers={"Content-Type": "application/json"}
            )  # ASCII JSON: \\ud800 escapes too
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


def start_bentoml_serve(model_uri: str, tmp_path: Path) -> tuple[subprocess.Popen, Path, str]:
    """`bentoml serve deploy.service:LMForge` on a free port for `model_uri`: the process, its log and its URL."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {
        **os.environ,
        MODEL_URI_ENV: model_uri,
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    bentoml = Path(sys.executable).parent / "bentoml"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(bentoml), "serve", "deploy.service:LMForge", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log, f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_bentoml_serve_without_a_model_does_not_crash_loop(bundles, tmp_path):
    """A bundle that fails to load (each reason a model can be missing: the in-process 503 tests above)."""
    uri = str(bundles / "truncated")
    proc, log, base = start_bentoml_serve(uri, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while "no model to serve" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        status, reason = request(f"{base}/readyz")
        assert status == 503 and reason.startswith(f"model unavailable: LMFORGE_MODEL_URI={uri}: "), (
            status,
            reason,
            log.read_text(),
        )
        status, body = request(f"{base}/classify", b'{"texts": ["def f(): pass"]}')
        assert status == 503 and f"LMFORGE_MODEL_URI={uri}: " in body
        time.sleep(5)  # a crash-looping worker would have restarted and logged again by now
        assert proc.poll() is None
        text = log.read_text()
        assert text.count("no model to serve") == 1 and text.count("Service lmforge initialized") == 1, text
        assert "Traceback" not in text, text
    finally:
        stop_server(proc)


@pytest.mark.slow
def test_bentoml_serve_answers_json_and_logs_a_bad_request_in_one_line(bundles, tmp_path):
    """The declared media type of /classify, and the filter on the `bentoml` logger's handlers: a request that fails
    BentoML's validation is one WARNING line in the worker's log, not a traceback."""
    proc, log, base = start_bentoml_serve(str(bundles / "good"), tmp_path)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if request(f"{base}/readyz")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            time.sleep(0.5)
        req = urllib.request.Request(
            f"{base}/classify", data=b'{"texts": ["def f(): pass"]}', headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.headers["Content-Type"] == "application/json" and json.loads(r.read())[0]["label"] in LABELS
        status, body = request(f"{base}/generate", b'{"prompt": "def f(", "top_p": 0}')
        assert status == 400 and "top_p" in body
        status, body = request(f"{base}/generate", b'{"prompt": "def f(", "max_new_tokens": 40, "temperature": 0}')
        assert status == 200 and json.loads(body)["tokens"] >= 1  # past block_size: the cached sampler's shift
        time.sleep(1)
        text = log.read_text()
        assert "Traceback" not in text, text
        assert [line for line in text.splitlines() if "WARNING" in line and "/generate" in line and "top_p" in line]
    finally:
        stop_server(proc)


# --- the API: batching, validation, auth, metadata, generation, reload, BentoML's model store ---------


@pytest.fixture(autouse=True)
def model_store(tmp_path):
    """A BentoML model store of the test's own (the service copies registry versions into it)."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.models.model import ModelStore

    BentoMLContainer.model_store.set(ModelStore(str(tmp_path / "bentoml-models")))
    yield tmp_path / "bentoml-models"
    BentoMLContainer.model_store.reset()


@pytest.fixture()
def two_versions(bundles, tmp_path, monkeypatch) -> tuple[str, object]:
    """A fresh store with `two` v1 (@champion) and v2 (the same bundle), as `lmforge promote` lays them out."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("two")
    for v in (1, 2):
        shutil.copytree(bundles / "good", tmp_path / f"v{v}" / "artifacts" / "bundle")
        tags = {
            "variant": "fp32",
            "git_commit": f"{v}" * 40,
            "test_macro_f1": "0.5",
            "lineage.data": "d" * 64,
            "gate.data_validation": "pass: suites passed",
        }
        client.create_model_version("two", source=str(tmp_path / f"v{v}"), tags=tags)
    client.set_registered_model_alias("two", "champion", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(MODEL_URI_ENV, "models:/two@champion")
    return uri, client


def test_classify_answers_with_labels_probabilities_and_the_model_version(app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        r = c.post("/classify", json={"texts": ["def f(): pass", "import asyncio", "x = 1"]})
    assert r.status_code == 200, r.text
    assert [p["model_version"] for p in r.json()] == ["lmforge-classifier/local"] * 3
    assert all(p["label"] in LABELS and abs(sum(p["probabilities"].values()) - 1) < 1e-3 for p in r.json())


BAD_REQUESTS = {
    "empty list": ("/classify", {"texts": []}, 400, "at least 1 item"),
    "blank text": ("/classify", {"texts": ["ok", "  \n"]}, 400, "empty or only whitespace"),
    "text too long": ("/classify", {"texts": ["a" * 20_001]}, 400, "at most 20000 characters"),
    "too many items": ("/classify", {"texts": ["a"] * 257}, 400, "at most 256 items"),
    "wrong type": ("/classify", {"texts": [1]}, 400, "valid string"),
    "not a list": ("/classify", {"texts": "def f(): pass"}, 400, "valid array"),
    "missing field": ("/classify", {}, 400, "Field required"),
    "max_new_tokens too big": ("/generate", {"prompt": "x", "max_new_tokens": 257}, 400, "less than or equal to 256"),
    "max_new_tokens a string": ("/generate", {"prompt": "x", "max_new_tokens": "5"}, 400, "valid integer"),
    "temperature nan": ("/generate", {"prompt": "x", "temperature": "nan"}, 400, "finite number"),
    "top_p zero": ("/generate", {"prompt": "x", "top_p": 0}, 400, "greater than or equal to 0.001"),
    "top_k negative": ("/generate", {"prompt": "x", "top_k": -1}, 400, "greater than or equal to 0"),
    "too many stops": ("/generate", {"prompt": "x", "stop": ["a"] * 9}, 400, "at most 8 items"),
    "empty stop": ("/generate", {"prompt": "x", "stop": [""]}, 400, "at least 1 character"),
    "negative seed": ("/generate_stream", {"prompt": "x", "seed": -1}, 400, "greater than or equal to 0"),
    "empty prompt": ("/generate_stream", {"prompt": ""}, 400, "at least 1 character"),
    "unknown setting": ("/generate", {"prompt": "x", "max_tokens": 5}, 400, "Extra inputs are not permitted"),
    "unpaired surrogate in a text": (
        "/classify",
        {"texts": ["def f(): \ud800"]},
        400,
        "Invalid JSON",
    ),  # no tokenizer takes one
    "unpaired surrogate in the prompt": ("/generate", {"prompt": "x\udfff"}, 400, "Invalid JSON"),
    "unpaired surrogate in a stop string": (
        "/generate_stream",
        {"prompt": "x", "stop": ["\ud800"]},
        400,
        "Invalid JSON",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_naming_the_field(case, app, bundles, monkeypatch):
    path, body, status, message = BAD_REQUESTS[case]
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        r = c.post(
            path, content=json.dumps(body), headers={"Content-Type": "application/json"}
        )  # ASCII JSON: \\ud800 escapes too
    assert r.status_code == status, r.text
    assert message in r.text


@pytest.mark.parametrize(
    "content, ctype, status, message",
    [
        (b'{"texts": ["def f(', "application/json", 400, "Invalid JSON"),
        (
            b"texts=def+f",
            "application/x-www-form-urlencoded",
            415,
            "send a JSON body with Content-Type: application/json",
        ),
        (b"def f(): pass", "text/plain", 415, "'text/plain' is not supported"),
    ],
)
def test_invalid_json_and_wrong_content_types_are_4xx(content, ctype, status, message, app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        r = c.post("/classify", content=content, headers={"Content-Type": ctype})
    assert r.status_code == status and message in r.text, r.text


def test_a_body_over_the_size_limit_is_413_before_it_is_read(app, bundles, monkeypatch):
    from deploy.requests import MAX_BODY_BYTES

    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        r = c.post(
            "/classify",
            content=b"{}",
            headers={"Content-Type": "application/json", "Content-Length": str(MAX_BODY_BYTES + 1)},
        )
    assert r.status_code == 413 and "over the limit" in r.text


def test_api_key_guards_everything_but_probes_metrics_and_docs(app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    monkeypatch.setenv("LMFORGE_API_KEY", "s3cret")
    body = {"texts": ["def f(): pass"]}
    with client(app) as c:
        assert c.post("/classify", json=body).status_code == 401
        r = c.post("/classify", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and "API key" in r.json()["error"]
        assert c.get("/metadata").status_code == 401
        assert c.post("/classify", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.post("/classify", json=body, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert [c.get(p).status_code for p in ("/healthz", "/livez", "/readyz", "/docs.json")] == [200] * 4


def test_without_a_key_there_is_no_auth(app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    with client(app) as c:
        assert c.post("/classify", json={"texts": ["def f(): pass"]}).status_code == 200


def test_generate_bounds_stop_strings_and_streams_the_same_text(app, bundles, monkeypatch):
    monkeypatch.setenv(MODEL_URI_ENV, str(bundles / "good"))
    body = {"prompt": "def parse(self, data):\n    ", "max_new_tokens": 24, "seed": 3, "temperature": 1.0}
    with client(app) as c:
        full = c.post("/generate", json=body).json()
        again = c.post("/generate", json=body).json()
        streamed = c.post("/generate_stream", json=body)
        assert full == again and full["model_version"] == "lmforge-classifier/local"  # seeded: reproducible
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/plain")
        assert streamed.text == full["text"]
        assert full["finish_reason"] in ("length", "eos") and full["tokens"] <= 24
        if full["text"][1:]:
            stop = full["text"][1:3]  # a stop string that occurs in the unconstrained text
            cut = c.post("/generate", json={**body, "stop": [stop]}).json()
            assert cut["finish_reason"] == "stop" and stop not in cut["text"] and full["text"].startswith(cut["text"])
        tiny = c.post(
            "/generate", json={**body, "temperature": 6.8e-63}
        )  # found by schemathesis: once a 500 (inf / inf)
        assert tiny.status_code == 200, tiny.text
        greedy = c.post("/generate", json={**body, "temperature": 0, "seed": None}).json()
        assert tiny.json()["text"] == greedy["text"]
        nucleus = c.post("/generate", json={**body, "top_p": 0.001, "seed": 11}).json()
        assert nucleus["text"] == greedy["text"]  # a nucleus of one token is greedy decoding


def test_metadata_names_the_registry_version_and_its_lineage(app, two_versions, model_store):
    with client(app) as c:
        meta = c.get("/metadata").json()
        label = c.post("/classify", json={"texts": ["def f(): pass"]}).json()[0]
    assert (meta["registered_model"], meta["version"], meta["model_version"], meta["source"]) == (
        "two",
        "1",
        "two/1",
        "registry",
    )
    assert meta["lineage"]["git_commit"] == "1" * 40 and meta["lineage"]["data_sha256"] == "d" * 64
    assert meta["lineage"]["validation"] == "pass: suites passed" and meta["metrics"]["macro_f1"] == 0.5
    assert label["model_version"] == "two/1"
    assert (
        meta["bentoml_model"] == "two:v1" and (model_store / "two" / "v1" / "lmforge.json").is_file()
    )  # served from BentoML's store


def test_reload_picks_up_a_new_champion_only_with_the_api_key(app, two_versions, monkeypatch):
    _, registry_client = two_versions
    with client(app) as c:
        assert c.post("/reload", json={}).status_code == 403  # off without a key
        monkeypatch.setenv("LMFORGE_API_KEY", "k")
        registry_client.set_registered_model_alias("two", "champion", "2")
        assert c.post("/reload", json={}).status_code == 401
        r = c.post("/reload", json={}, headers={"X-API-Key": "k"})
        assert r.status_code == 200 and r.json() == {"model_version": "two/2", "previous": "two/1", "changed": True}
        assert c.get("/metadata", headers={"X-API-Key": "k"}).json()["version"] == "2"
        registry_client.delete_registered_model_alias("two", "champion")
        r = c.post("/reload", json={}, headers={"X-API-Key": "k"})  # nothing to load: keeps serving v2
        assert r.status_code == 409 and "still serving two/2" in r.json()["error"]
        assert (
            c.post("/classify", json={"texts": ["x"]}, headers={"X-API-Key": "k"}).json()[0]["model_version"] == "two/2"
        )


def test_the_store_latest_is_always_the_version_last_loaded(two_versions, model_store):
    """What `bentoml build` packs (`<name>:latest`) is the version served last, after a rollback too."""
    import bentoml

    from deploy.resolve import open_model

    for version, latest in (("1", "two:v1"), ("2", "two:v2"), ("1", "two:v1")):
        assert open_model(f"models:/two/{version}").bentoml_model == f"two:v{version}"
        assert str(bentoml.models.get("two:latest").tag) == latest
    assert sorted(str(m.tag) for m in bentoml.models.list("two")) == ["two:v1", "two:v2"]


def test_texts_are_normalized_the_way_the_training_texts_were(bundles, tmp_path):
    """A registered bundle records the clean stage's normalization; the servers apply it to every text to classify."""
    from deploy.core import classify
    from deploy.resolve import open_model, write_preprocess
    from tasks.clean import clean_text
    from tasks.shared.config.clean import CleanConfig

    shutil.copytree(bundles / "good", tmp_path / "normalized")
    write_preprocess(tmp_path / "normalized", {"unicode_form": "NFKC", "tab_size": 4})
    raw = "def f(x):\r\n\tif x:\t# ﬁne\r\n\t\treturn x\u200b   \r\n\r\n\r\n\r\nimport asyncio\x07"
    cleaned = clean_text(raw, CleanConfig(unicode_form="NFKC", tab_size=4))
    assert cleaned != raw
    model, plain = open_model(str(tmp_path / "normalized")), open_model(str(bundles / "good"))
    assert model.normalize == {"unicode_form": "NFKC", "tab_size": 4} and plain.normalize is None
    probs = lambda m, t: classify(m, [t])[0]["probabilities"]  # noqa: E731
    assert probs(model, raw) == probs(model, cleaned) == probs(plain, cleaned)  # served like the test split was scored
    assert classify(model, ["\x00\x01"])[0]["label"] in LABELS  # nothing left after normalizing: classified as sent


# --- the knowledge-graph task: /extract and /graph/query ---------------------------------------------


@pytest.fixture
def kg_service(tmp_path, monkeypatch):
    """The service with no classifier and the kg task resolved to the stand-in extractor (tests/unit/
    test_kg_graph.py's) and the graph built with it from small tables."""
    from conftest import make_paths
    from test_kg_graph import FakeExtractor, write_tables

    from deploy import service
    from deploy.resolve import ServedKG
    from tasks.kg import graph
    from tasks.kg.rdf import GRAPH_FILE
    from tasks.shared.config.kg_graph import KgGraphConfig

    paths = make_paths(tmp_path)
    write_tables(paths.kg_data)
    graph.run(KgGraphConfig(), paths, extractor=FakeExtractor())
    kg = ServedKG(FakeExtractor(), paths.kg_graph / GRAPH_FILE, "fake", "folder")
    monkeypatch.setattr(service, "open_kg", lambda: kg)
    monkeypatch.setenv(MODEL_URI_ENV, str(tmp_path / "no-classifier"))
    monkeypatch.setenv("LMFORGE_SPARQL_TIMEOUT_S", "1")
    monkeypatch.setenv("LMFORGE_SPARQL_MAX_ROWS", "2")


def test_extract_and_graph_query_are_served_without_a_classifier(app, kg_service):
    with client(app) as c:
        r = c.post("/extract", json={"texts": ["Raises JSONDecodeError.", "Nothing here."]})
        assert r.status_code == 200, r.text
        first, second = r.json()
        assert [(e["text"], e["link"]) for e in first["entities"]] == [
            ("JSONDecodeError", "json.decoder.JSONDecodeError")
        ]
        assert first["relations"] == [{"head": -1, "relation": "raises", "tail": 0, "score": 0.75}]
        assert second == {"entities": [], "relations": [], "model_version": "lmforge-extractor/local"}
        q = c.post("/graph/query", json={"sparql": "SELECT ?f WHERE { ?f lf:raises ent:builtins.ValueError }"})
        assert q.status_code == 200, q.text
        assert q.json()["rows"] == [{"f": {"type": "uri", "value": "https://lmforge.dev/entity/json.loads"}}]
        rows = c.post("/graph/query", json={"sparql": "SELECT * { ?s ?p ?o }"}).json()
        assert len(rows["rows"]) == 2 and rows["truncated"] is True  # LMFORGE_SPARQL_MAX_ROWS
        assert c.post("/classify", json={"texts": ["x"]}).status_code == 503


LINK = "json.decoder.JSONDecodeError"
KG_BAD_REQUESTS = {
    "no texts": ("/extract", {"texts": []}, 400, "at least 1 item"),
    "blank text": ("/extract", {"texts": [" "]}, 400, "empty or only whitespace"),
    "too many texts": ("/extract", {"texts": ["a"] * 65}, 400, "at most 64 items"),
    "text too long": ("/extract", {"texts": ["a" * 4001]}, 400, "at most 4000 characters"),
    "texts not a list": ("/extract", {"texts": "a"}, 400, "valid array"),
    "no sparql": ("/graph/query", {}, 400, "Field required"),
    "blank sparql": ("/graph/query", {"sparql": " "}, 400, "empty or only whitespace"),
    "sparql not a string": ("/graph/query", {"sparql": 1}, 400, "valid string"),
    "update": ("/graph/query", {"sparql": "INSERT DATA { <http://a> <http://b> <http://c> }"}, 400, "read-only"),
    "service": ("/graph/query", {"sparql": "SELECT * { SERVICE <http://x/> { ?s ?p ?o } }"}, 400, "SERVICE"),
    "construct": ("/graph/query", {"sparql": "CONSTRUCT WHERE { ?s ?p ?o }"}, 400, "only SELECT and ASK"),
    "invalid": ("/graph/query", {"sparql": "SELECT ?x WHERE {"}, 400, "invalid SPARQL"),
    "too slow": (
        "/graph/query",
        {"sparql": "SELECT (COUNT(*) AS ?n) { ?a ?b ?c . ?d ?e ?f . ?g ?h ?i . ?j ?k ?l }"},
        408,
        "1 s limit",
    ),
}


@pytest.mark.parametrize("case", KG_BAD_REQUESTS)
def test_kg_bad_requests_get_a_4xx_naming_the_problem(case, app, kg_service):
    path, body, status, message = KG_BAD_REQUESTS[case]
    with client(app) as c:
        r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.text


def test_without_an_extractor_extract_and_graph_query_are_404_and_a_broken_one_503(app, tmp_path, monkeypatch):
    from deploy import service
    from deploy.resolve import ModelUnavailable

    monkeypatch.setattr(service, "open_kg", lambda: None)
    monkeypatch.setenv(MODEL_URI_ENV, str(tmp_path / "no-classifier"))
    with client(app) as c:
        r = c.post("/extract", json={"texts": ["x"]})
        assert r.status_code == 404 and "no extractor registered or built" in r.json()["error"]
        assert c.post("/graph/query", json={"sparql": "ASK {}"}).status_code == 404

    def broken():
        raise ModelUnavailable("/x/extractor: model.safetensors: truncated")

    monkeypatch.setattr(service, "open_kg", broken)
    with client(app) as c:
        r = c.post("/extract", json={"texts": ["x"]})
        assert r.status_code == 503 and "model.safetensors: truncated" in r.json()["error"]


# --- the alignment task: /search and /embed ------------------------------------------------------------


@pytest.fixture
def align_service(monkeypatch, tmp_path):
    """The service with no classifier and the alignment task resolved to the stand-in encoder and index (tests/unit/
    test_align_serving.py's), served mode dense."""
    from test_align_serving import stand_in

    from deploy import service

    served = stand_in("dense")
    monkeypatch.setattr(service, "open_search", lambda: served)
    monkeypatch.setenv(MODEL_URI_ENV, str(tmp_path / "no-classifier"))
    return served


def test_search_and_embed_are_served_without_a_classifier(app, align_service):
    with client(app) as c:
        r = c.post("/search", json={"query": "return the message content type", "k": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["mode"], body["model_version"], len(body["results"])) == ("dense", "lmforge-encoder/local", 2)
        top = body["results"][0]
        assert top == {
            "id": "email.message.Message.get_content_type",
            "score": pytest.approx(top["score"]),
            "qualname": "email.message.Message.get_content_type",
            "source": "email/message.py",
            "line": 588,
            "snippet": "def get_content_type(self):",
        }
        r = c.post("/search", json={"query": "join path", "mode": "bm25"})
        assert r.json()["mode"] == "bm25" and r.json()["results"][0]["id"] == "os.path.join"
        assert len(r.json()["results"]) == 4  # k defaults to 10: every item of the stand-in
        r = c.post("/embed", json={"texts": ["parse json", "def loads(s):"], "kind": "code"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["dim"] == 32 and len(out["vectors"]) == 2 and len(out["vectors"][0]) == 32
        assert abs(sum(x * x for x in out["vectors"][0]) - 1) < 1e-4
        assert c.post("/classify", json={"texts": ["x"]}).status_code == 503


ALIGN_BAD_REQUESTS = {
    "no query": ("/search", {"k": 3}, "Field required"),
    "blank query": ("/search", {"query": "  "}, "empty or only whitespace"),
    "long query": ("/search", {"query": "a" * 2001}, "at most 2000 characters"),
    "k 0": ("/search", {"query": "x", "k": 0}, "greater than or equal to 1"),
    "k 101": ("/search", {"query": "x", "k": 101}, "less than or equal to 100"),
    "k not an integer": ("/search", {"query": "x", "k": "3"}, "valid integer"),
    "unknown mode": ("/search", {"query": "x", "mode": "fuzzy"}, "'dense', 'bm25' or 'hybrid'"),
    "no kind": ("/embed", {"texts": ["x"]}, "Field required"),
    "unknown kind": ("/embed", {"texts": ["x"], "kind": "image"}, "'text' or 'code'"),
    "no texts": ("/embed", {"texts": [], "kind": "text"}, "at least 1 item"),
    "too many texts": ("/embed", {"texts": ["a"] * 65, "kind": "text"}, "at most 64 items"),
    "text too long": ("/embed", {"texts": ["a" * 20_001], "kind": "code"}, "at most 20000 characters"),
}


@pytest.mark.parametrize("case", ALIGN_BAD_REQUESTS)
def test_align_bad_requests_get_a_400_naming_the_problem(case, app, align_service):
    path, body, message = ALIGN_BAD_REQUESTS[case]
    with client(app) as c:
        r = c.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.text


def test_without_an_encoder_search_and_embed_are_404_and_a_broken_one_503(app, tmp_path, monkeypatch):
    from deploy import service

    monkeypatch.setattr(service, "open_search", lambda: None)
    monkeypatch.setenv(MODEL_URI_ENV, str(tmp_path / "no-classifier"))
    with client(app) as c:
        r = c.post("/search", json={"query": "x"})
        assert r.status_code == 404 and "no encoder registered or built" in r.json()["error"]
        assert c.post("/embed", json={"texts": ["x"], "kind": "text"}).status_code == 404

    def broken():
        raise ModelUnavailable("/x/encoder: encoder.safetensors: truncated")

    monkeypatch.setattr(service, "open_search", broken)
    with client(app) as c:
        r = c.post("/search", json={"query": "x"})
        assert r.status_code == 503 and "encoder.safetensors: truncated" in r.json()["error"]
