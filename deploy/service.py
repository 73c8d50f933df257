"""BentoML service: the `champion` classifier and its pretrained LM behind POST /classify and /generate.

Start it with `make serve` (`bentoml serve deploy.service:LMForge`). The model comes from the MLflow
registry (`models:/<registered_model>@champion` in the store named by MLFLOW_TRACKING_URI or
params.yaml); LMFORGE_MODEL_URI overrides it with another model URI or a local bundle folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import bentoml
from pydantic import BaseModel, Field

from models.bundle import Bundle, load_bundle

MODEL_URI_ENV = "LMFORGE_MODEL_URI"
EXAMPLE_INPUT = [
    "def run_until_complete(self, future):\n    future = tasks.ensure_future(future, loop=self)\n    return future.result()",
    "def get_content_type(self):\n    \"\"\"Return the message's content type.\"\"\"\n    return self.get('content-type', 'text/plain')",
]
EXAMPLE_PROMPT = "def read_config(path):\n    "


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

    return f"models:/{load_params().tracking.registered_model}@champion"


def load_service_bundle(uri: str) -> Bundle:
    """Load a bundle from a local folder or an MLflow model URI (downloaded, then loaded without pickle)."""
    if Path(uri).is_dir():
        return load_bundle(uri)
    import mlflow

    from tasks.shared.config.params import load_params
    from tasks.shared.tracking import tracking_uri

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(tracking_uri(load_params().tracking))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="lmforge-")))
    return load_bundle(local / "artifacts" / "bundle")


Texts = Annotated[list[Annotated[str, Field(min_length=1, max_length=20000)]], Field(min_length=1, max_length=256)]


@bentoml.service(name="lmforge", traffic={"timeout": 60})
class LMForge:
    def __init__(self) -> None:
        self.model_uri = default_model_uri()
        self.bundle = load_service_bundle(self.model_uri)

    @bentoml.api
    def classify(self, texts: Texts = EXAMPLE_INPUT) -> list[Classification]:
        """Label each text with the stdlib package it most likely comes from, with class probabilities."""
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
        if not self.bundle.can_generate:
            from bentoml.exceptions import InvalidArgument

            raise InvalidArgument("the champion was pretrained as a masked LM and cannot generate text")
        text = self.bundle.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None, seed=seed)
        return Generation(prompt=prompt, text=text)
