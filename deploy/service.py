"""BentoML service: the `champion` classifier and its pretrained LM behind POST /classify and /generate.

Start it with `make serve` (`bentoml serve deploy.service:LMForge`). The model comes from the MLflow
registry (`models:/<registered_model>@champion` in the store named by MLFLOW_TRACKING_URI or
params.yaml); LMFORGE_MODEL_URI overrides it with another model URI or a local bundle folder.

A model that cannot be found or loaded never crash-loops the server: `check_model` names the problem
in one line before start-up, and a worker started anyway stays up, logs that line once, and answers
/readyz, /classify and /generate with HTTP 503 and the same line.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, Field

from models.bundle import Bundle, load_bundle
from models.checkpoint import ArtifactError

MODEL_URI_ENV = "LMFORGE_MODEL_URI"
EXAMPLE_INPUT = [
    "def run_until_complete(self, future):\n    future = tasks.ensure_future(future, loop=self)\n    return future.result()",
    "def get_content_type(self):\n    \"\"\"Return the message's content type.\"\"\"\n    return self.get('content-type', 'text/plain')",
]
EXAMPLE_PROMPT = "def read_config(path):\n    "
BUNDLE_ARTIFACT = Path("artifacts") / "bundle"
"""Where the bundle lies inside a model logged by `lmforge promote`."""

logger = logging.getLogger("bentoml.lmforge")


class ModelUnavailable(Exception):
    """The model to serve cannot be found or loaded; the message is one line naming what and where."""


class Classification(BaseModel):
    label: str
    probabilities: dict[str, float]


class Generation(BaseModel):
    prompt: str
    text: str


def default_model_uri() -> str:
    """LMFORGE_MODEL_URI, else the champion of the registered model named in params.yaml."""
    if os.environ.get(MODEL_URI_ENV):
        return os.environ[MODEL_URI_ENV]
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError

    try:
        return f"models:/{load_params().tracking.registered_model}@champion"
    except UserError as e:
        raise ModelUnavailable(str(e)) from None


def _line(e: Exception) -> str:
    """The message of `e` on one line."""
    return " ".join(str(e).split())


def _broken(e: ArtifactError, root: Path, shown: str) -> ModelUnavailable:
    """`shown: <file inside the bundle>: <what is wrong>`."""
    file = e.file.relative_to(root) if e.file.is_relative_to(root) else e.file
    return ModelUnavailable(f"{shown}: {file}: {e.problem}")


def _registry_uri() -> str:
    """The MLflow store holding the registry: MLFLOW_REGISTRY_URI, MLFLOW_TRACKING_URI or params.yaml."""
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError
    from tasks.shared.tracking import tracking_uri

    if os.environ.get("MLFLOW_REGISTRY_URI"):
        return os.environ["MLFLOW_REGISTRY_URI"]
    try:
        return tracking_uri(load_params().tracking)
    except UserError as e:
        raise ModelUnavailable(str(e)) from None


def _registered_source(uri: str, store: str) -> str:
    """Where the artifacts of a `models:/<name>@<alias>` or `models:/<name>/<version>` URI lie in `store`
    (other URIs come back as they are).

    Looked up here rather than by MLflow, which resolves registry URIs against its global store and
    answers "not found" in one line only some of the time.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if m is None:
        return uri
    name, alias, version = m.groups()
    db = store.removeprefix("sqlite:///") if store.startswith("sqlite:///") else None
    if db is not None and not Path(db).exists():  # do not create an empty store just to look in it
        raise ModelUnavailable(f"no registered model {name!r} in {store} (no MLflow store yet): run `make pipeline` first")
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ModelUnavailable(f"{uri}: {_line(e)}") from None
        raise ModelUnavailable(f"no registered model {name!r} in {store}: run `make pipeline` first") from None
    try:
        version = client.get_model_version_by_alias(name, alias).version if alias else version
        return client.get_model_version_download_uri(name, version)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # the store failed, not the lookup
            raise ModelUnavailable(f"{uri}: {_line(e)}") from None
        if alias:
            raise ModelUnavailable(f"{uri}: alias {alias} not set (no version passed the gates yet)") from None
        raise ModelUnavailable(f"{uri}: no version {version} of {name!r} in {store}") from None


def load_service_bundle(uri: str) -> Bundle:
    """Load a bundle from a local folder or an MLflow model URI (downloaded, then loaded without pickle).

    Raises:
        ModelUnavailable: the folder or URI does not exist, the registry has no such model or alias,
            or a file of the bundle is missing, truncated or corrupt.
    """
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", uri):  # a local path, not a URI
        if not Path(uri).is_dir():
            raise ModelUnavailable(f"{uri}: no such folder or model URI")
        try:
            return load_bundle(uri)
        except ArtifactError as e:
            raise _broken(e, Path(uri), uri) from None
    import mlflow
    from mlflow.exceptions import MlflowException

    store = _registry_uri()
    source = _registered_source(uri, store)
    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:  # the bundle is read into memory
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=store, registry_uri=store))
        except (MlflowException, OSError) as e:
            raise ModelUnavailable(f"{uri}: {_line(e)} (MLflow store {store})") from None
        if not (local / BUNDLE_ARTIFACT).is_dir():
            raise ModelUnavailable(f"{uri}: not an lmforge model (no {BUNDLE_ARTIFACT.as_posix()})")
        try:
            return load_bundle(local / BUNDLE_ARTIFACT)
        except ArtifactError as e:
            raise _broken(e, local, uri) from None


def open_model(uri: str | None = None) -> tuple[str, Bundle]:
    """The model URI to serve (`uri`, else LMFORGE_MODEL_URI, else the registry's champion) and its bundle.

    Raises:
        ModelUnavailable: one line naming what is wrong and where (a URI from LMFORGE_MODEL_URI is
            shown as `LMFORGE_MODEL_URI=<uri>`).
    """
    env = os.environ.get(MODEL_URI_ENV) if uri is None else None
    uri = uri or default_model_uri()
    try:
        return uri, load_service_bundle(uri)
    except ModelUnavailable as e:
        if env and str(e).startswith(env):
            raise ModelUnavailable(f"{MODEL_URI_ENV}={e}") from None
        raise


def check_model(uri: str | None = None) -> str:
    """Preflight of `lmforge serve`: load the model the service would serve; returns a one-line description.

    Raises:
        ModelUnavailable: with one line naming what is wrong and where.
    """
    uri, bundle = open_model(uri)
    generate = "with /generate" if bundle.can_generate else "no /generate"
    return f"{uri}: {bundle.variant} classifier over {len(bundle.labels)} labels, {generate}"


Texts = Annotated[list[Annotated[str, Field(min_length=1, max_length=20000)]], Field(min_length=1, max_length=256)]


@bentoml.service(name="lmforge", traffic={"timeout": 60})
class LMForge:
    def __init__(self) -> None:
        self.model_uri, self.bundle, self.unavailable = None, None, None
        try:
            self.model_uri, self.bundle = open_model()
        except ModelUnavailable as e:  # stay up and say why on every request, instead of crash-looping
            self.unavailable = str(e)
            logger.error("lmforge: no model to serve, answering 503: %s", self.unavailable)
        except Exception as e:  # a bug: its traceback once, then the same 503s (a restart would fail again)
            self.unavailable = f"{type(e).__name__}: {_line(e)}"
            logger.exception("lmforge: loading the model failed, answering 503")

    def __is_ready__(self) -> bool:
        """/readyz: 503 with the reason while there is no model."""
        if self.unavailable is not None:
            from starlette.exceptions import HTTPException

            raise HTTPException(status_code=503, detail=f"model unavailable: {self.unavailable}")
        return True

    def _unavailable(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": f"model unavailable: {self.unavailable}"}, status_code=503)

    @bentoml.api
    def classify(self, texts: Texts = EXAMPLE_INPUT) -> list[Classification]:
        """Label each text with the stdlib package it most likely comes from, with class probabilities."""
        if self.bundle is None:
            return self._unavailable()
        return [Classification(label=p.label, probabilities=p.probabilities) for p in self.bundle.classify(texts)]

    @bentoml.api
    def generate(
        self,
        prompt: Annotated[str, Field(min_length=1, max_length=4000)] = EXAMPLE_PROMPT,
        max_new_tokens: Annotated[int, Field(ge=1, le=256)] = 64,
        temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.8,
        top_k: Annotated[int, Field(ge=0, le=1000)] = 50,
        seed: int | None = None,
    ) -> Generation:
        """Continue `prompt` with the pretrained language model (bounded by `max_new_tokens`)."""
        if self.bundle is None:
            return self._unavailable()
        if not self.bundle.can_generate:
            from bentoml.exceptions import InvalidArgument

            raise InvalidArgument("the champion was pretrained as a masked LM and cannot generate text")
        text = self.bundle.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, seed=seed)
        return Generation(prompt=prompt, text=text)
