"""The inference core behind both front ends: the BentoML service (REST, deploy/service.py) and the gRPC
server (deploy/grpc_server.py). One place decides which model is served, what a valid request is, and
how texts are classified and continued, so the two protocols cannot drift apart.

Which model (first that applies):

1. `LMFORGE_MODEL_URI`: a bundle folder or an MLflow model URI (`models:/<name>@<alias>`, `models:/<name>/<n>`,
   `runs:/...`);
2. inside a built Bento: the model the Bento carries (BentoML's model store of the Bento, no tracking store needed);
3. the registry's `@champion` (MLFLOW_TRACKING_URI, else params.yaml's store).

A registry version is copied into BentoML's model store as `<registered model>:v<version>` (with its
registry tags as `lmforge.json`) and served from there, so `bentoml build -f deploy/bentofile.yaml .` packs
exactly the version being served (the store's `latest` is always the last version loaded).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from models.bundle import Bundle, load_bundle
from models.checkpoint import ArtifactError, write_manifest
from tasks.shared.text import normalize_text

MODEL_URI_ENV = "LMFORGE_MODEL_URI"
API_KEY_ENV = "LMFORGE_API_KEY"
"""When set, both front ends (REST and gRPC) require this key; unset, there is no auth."""
MAX_BODY_BYTES = 32 * 2**20
"""Largest request body (REST) or message (gRPC): the largest valid request (256 texts of 20,000 characters) fits."""
BUNDLE_ARTIFACT = Path("artifacts") / "bundle"
"""Where the bundle lies inside a model logged by `lmforge promote`."""
DEFAULT_MODEL_NAME = "lmforge-classifier"
"""The BentoML model name used when no registered model names it (a bundle folder)."""
PREPROCESS_FILE = "preprocess.json"
"""In a registered bundle: how the clean stage normalized the training texts (`lmforge promote` writes it); the
servers normalize every text to classify the same way. A bundle without it is served as texts come."""
INFO_FILE = "lmforge.json"
"""Beside the bundle in a BentoML model: what the registry said about the version (name, version, tags)."""
DEPLOY = Path(__file__).resolve().parent
IN_BENTO = (DEPLOY.parent.parent / "bento.yaml").is_file()
"""This code runs from a built Bento (`<bento>/src/deploy/core.py` beside `<bento>/bento.yaml`)."""


@dataclass(frozen=True)
class Limits:
    """Bounds of a request; anything outside them is an InvalidInput (HTTP 400, gRPC INVALID_ARGUMENT)."""

    max_items: int = 256
    max_text_chars: int = 20_000
    max_prompt_chars: int = 4_000
    max_new_tokens: int = 256
    max_temperature: float = 2.0
    max_top_k: int = 1_000
    min_top_p: float = 0.001
    max_stop: int = 8
    max_stop_chars: int = 64
    max_seed: int = 2**63 - 1


LIMITS = Limits()


class ModelUnavailable(Exception):
    """The model to serve cannot be found or loaded; the message is one line naming what and where."""


class InvalidInput(ValueError):
    """A request outside the service's contract; the message names the field and the bound."""


class CannotGenerate(Exception):
    """The served model has no causal LM (HTTP 400, gRPC FAILED_PRECONDITION)."""


def check_can_generate(model: "ServedModel") -> None:
    if not model.bundle.can_generate:
        raise CannotGenerate("the served model was pretrained as a masked LM and cannot generate text")


def _line(e: Exception) -> str:
    """The message of `e` on one line."""
    return " ".join(str(e).split())


# --- requests --------------------------------------------------------------------------------------


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (JSON may carry unpaired surrogates, which no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: unpaired surrogate {text[e.start]!r} at character {e.start}"
    return None


def check_texts(texts, limits: Limits = LIMITS) -> list[str]:
    """`texts` if it is a list of 1..max_items non-blank strings of at most max_text_chars each."""
    if not isinstance(texts, (list, tuple)):
        raise InvalidInput(f"texts: expected a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidInput("texts: empty list; send at least one text")
    if len(texts) > limits.max_items:
        raise InvalidInput(f"texts: {len(texts)} items, at most {limits.max_items} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}]: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise InvalidInput(f"texts[{i}]: empty or only whitespace")
        if len(t) > limits.max_text_chars:
            raise InvalidInput(f"texts[{i}]: {len(t)} characters, at most {limits.max_text_chars}")
        if problem := unicode_problem(t):
            raise InvalidInput(f"texts[{i}]: {problem}")
    return list(texts)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    """0: no top-k cut."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings (which is not returned)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        check_generation(self)


def check_generation(r: GenerationRequest, limits: Limits = LIMITS) -> GenerationRequest:
    def number(name: str, kind: type) -> None:
        v = getattr(r, name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float) if kind is float else int)
            or (kind is float and not math.isfinite(v))
        ):
            raise InvalidInput(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {v!r}")

    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise InvalidInput("prompt: empty or not a string")
    if len(r.prompt) > limits.max_prompt_chars:
        raise InvalidInput(f"prompt: {len(r.prompt)} characters, at most {limits.max_prompt_chars}")
    if problem := unicode_problem(r.prompt):
        raise InvalidInput(f"prompt: {problem}")
    for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float)):
        number(name, kind)
    if not 1 <= r.max_new_tokens <= limits.max_new_tokens:
        raise InvalidInput(f"max_new_tokens: {r.max_new_tokens}, must be 1..{limits.max_new_tokens}")
    if not 0 <= r.temperature <= limits.max_temperature:
        raise InvalidInput(f"temperature: {r.temperature}, must be 0..{limits.max_temperature} (0: greedy)")
    if not 0 <= r.top_k <= limits.max_top_k:
        raise InvalidInput(f"top_k: {r.top_k}, must be 0..{limits.max_top_k} (0: no cut)")
    if not limits.min_top_p <= r.top_p <= 1:
        raise InvalidInput(f"top_p: {r.top_p}, must be {limits.min_top_p}..1")
    if not isinstance(r.stop, (list, tuple)) or len(r.stop) > limits.max_stop:
        raise InvalidInput(f"stop: at most {limits.max_stop} strings")
    for i, s in enumerate(r.stop):
        if not isinstance(s, str) or not s or len(s) > limits.max_stop_chars:
            raise InvalidInput(f"stop[{i}]: must be a non-empty string of at most {limits.max_stop_chars} characters")
        if problem := unicode_problem(s):
            raise InvalidInput(f"stop[{i}]: {problem}")
    if r.seed is not None and (
        isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed <= limits.max_seed
    ):
        raise InvalidInput(f"seed: {r.seed!r}, must be an integer 0..2^63-1")
    return r


# --- the model -------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """A loaded bundle and what is known about it (for /metadata and every response's model version)."""

    bundle: Bundle
    uri: str
    source: str
    """`registry`, `bento` (the model a built Bento carries) or `folder`."""
    name: str = DEFAULT_MODEL_NAME
    version: str = "local"
    tags: dict[str, str] = field(default_factory=dict)
    bentoml_model: str | None = None
    normalize: dict | None = None
    """normalize_text's settings from the bundle's preprocess.json (None: texts are classified as they come)."""
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def model_version(self) -> str:
        """`<name>/<version>` as every response names it."""
        return f"{self.name}/{self.version}"

    def metadata(self) -> dict:
        """Name, version, variant, lineage and test metrics of the served model (GET /metadata)."""
        tags = self.tags
        data = {
            k.split(".", 3)[3]: v
            for k, v in tags.items()
            if k.startswith("dvc.") and k.count(".") >= 3 and ".outs." in k and not k.endswith(".py")
        }
        return {
            "registered_model": self.name,
            "version": self.version,
            "model_version": self.model_version,
            "variant": tags.get("variant", self.bundle.variant),
            "source": self.source,
            "model_uri": self.uri,
            "bentoml_model": self.bentoml_model,
            "loaded_at": self.loaded_at,
            "labels": list(self.bundle.labels),
            "can_generate": self.bundle.can_generate,
            "normalize": self.normalize,
            "lineage": {
                "git_commit": tags.get("git_commit"),
                "data_sha256": tags.get("lineage.data"),
                "code_sha256": tags.get("lineage.code"),
                "params_sha256": tags.get("lineage.params"),
                "params_file_sha256": tags.get("params_sha256"),
                "data_hashes": data,
                "test_data_sha256": tags.get("test_data_sha256"),
                "artifact_sha256": tags.get("artifact_sha256"),
                "tokenizer_sha256": tags.get("tokenizer_sha256"),
                "validation": tags.get("gate.data_validation") or tags.get("ge_success"),
                "prefect_flow_run_id": tags.get("prefect_flow_run_id") or None,
                "mlflow_run_id": tags.get("mlflow_promote_run_id"),
                "mlflow_parent_run_id": tags.get("mlflow_parent_run_id") or None,
            },
            "gates": {k[len("gate.") :]: v for k, v in tags.items() if k.startswith("gate.")},
            "metrics": {
                k[len("test_") :]: _number(v)
                for k, v in tags.items()
                if k.startswith("test_") and _number(v) is not None
            },
        }


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _broken(e: ArtifactError, root: Path, shown: str) -> ModelUnavailable:
    """`shown: <file inside the bundle>: <what is wrong>`."""
    file = e.file.relative_to(root) if e.file.is_relative_to(root) else e.file
    return ModelUnavailable(f"{shown}: {file}: {e.problem}")


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


def registry_uri() -> str:
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


def registered_version(uri: str, store: str):
    """The MLflow ModelVersion a `models:/<name>@<alias>` or `models:/<name>/<version>` URI names in `store`
    (None for other URIs).

    Looked up here rather than by MLflow, which resolves registry URIs against its global store and
    answers "not found" in one line only some of the time.
    """
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if m is None:
        return None
    name, alias, version = m.groups()
    db = store.removeprefix("sqlite:///") if store.startswith("sqlite:///") else None
    if db is not None and not Path(db).exists():  # do not create an empty store just to look in it
        raise ModelUnavailable(
            f"no registered model {name!r} in {store} (no MLflow store yet): run `make pipeline` first"
        )
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise ModelUnavailable(f"{uri}: {_line(e)}") from None
        raise ModelUnavailable(f"no registered model {name!r} in {store}: run `make pipeline` first") from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code not in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
        ):  # the store failed, not the lookup
            raise ModelUnavailable(f"{uri}: {_line(e)}") from None
        if alias:
            raise ModelUnavailable(f"{uri}: alias {alias} not set (no version passed the gates yet)") from None
        raise ModelUnavailable(f"{uri}: no version {version} of {name!r} in {store}") from None


def _load_folder(path: Path, shown: str, root: Path | None = None) -> Bundle:
    """load_bundle(path); a broken file is named relative to `root` (default: `path`)."""
    try:
        return load_bundle(path)
    except ArtifactError as e:
        raise _broken(e, root or path, shown) from None


def write_preprocess(bundle_dir: Path, normalize: dict) -> None:
    """Record in a bundle how its training texts were normalized (then its manifest again, to cover the file)."""
    (Path(bundle_dir) / PREPROCESS_FILE).write_text(json.dumps({"normalize": normalize}, indent=1))
    write_manifest(bundle_dir)


def read_preprocess(bundle_dir: Path) -> dict | None:
    """normalize_text's settings recorded in a bundle, or None (a bundle written before they were recorded)."""
    f = Path(bundle_dir) / PREPROCESS_FILE
    if not f.is_file():
        return None
    try:
        normalize = json.loads(f.read_text())["normalize"]
        normalize_text("x", **normalize)
        return normalize
    except (ValueError, KeyError, TypeError) as e:
        raise ModelUnavailable(f"{f}: unreadable ({_line(e)})") from None


def _download(uri: str, source: str, store: str, dst: Path) -> Path:
    """The bundle folder of the MLflow model at `source`, downloaded into `dst`."""
    from mlflow.exceptions import MlflowException

    import mlflow

    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(dst), tracking_uri=store, registry_uri=store
            )
        )
    except (MlflowException, OSError) as e:
        raise ModelUnavailable(f"{uri}: {_line(e)} (MLflow store {store})") from None
    if not (local / BUNDLE_ARTIFACT).is_dir():
        raise ModelUnavailable(f"{uri}: not an lmforge model (no {BUNDLE_ARTIFACT.as_posix()})")
    return local


def load_service_bundle(uri: str) -> Bundle:
    """Load a bundle from a local folder or an MLflow model URI (downloaded, then loaded without pickle).

    Raises:
        ModelUnavailable: the folder or URI does not exist, the registry has no such model or alias,
            or a file of the bundle is missing, truncated or corrupt.
    """
    return _open(uri, to_store=False).bundle


def _is_path(uri: str) -> bool:
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", uri)


def _open(uri: str, to_store: bool) -> ServedModel:
    if _is_path(uri):
        if not Path(uri).is_dir():
            raise ModelUnavailable(f"{uri}: no such folder or model URI")
        return ServedModel(_load_folder(Path(uri), uri), uri=uri, source="folder", normalize=read_preprocess(Path(uri)))

    store = registry_uri()
    mv = registered_version(uri, store)
    if mv is not None and to_store:
        return _from_store(uri, mv, store)
    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:  # the bundle is read into memory
        local = _download(uri, _source(mv, store) if mv is not None else uri, store, Path(tmp))
        bundle = _load_folder(local / BUNDLE_ARTIFACT, uri, local)
        normalize = read_preprocess(local / BUNDLE_ARTIFACT)
    if mv is None:
        return ServedModel(bundle, uri=uri, source="mlflow", normalize=normalize)
    return ServedModel(
        bundle,
        uri=uri,
        source="registry",
        name=mv.name,
        version=str(mv.version),
        tags=dict(mv.tags or {}),
        normalize=normalize,
    )


# --- BentoML's model store -------------------------------------------------------------------------

_store_lock = threading.Lock()


def store_tag(name: str, version: str) -> str:
    """The BentoML model tag of a registry version: `<name>:v<version>`."""
    return f"{name.lower()}:v{version}"


def _source(mv, store: str) -> str:
    """Where the artifacts of registry version `mv` lie."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store, registry_uri=store).get_model_version_download_uri(mv.name, mv.version)


def _from_store(uri: str, mv, store: str) -> ServedModel:
    """The registry version `mv`, copied into BentoML's model store (once) and served from there."""
    import bentoml

    tag = store_tag(mv.name, str(mv.version))
    with _store_lock, _file_lock():
        existing = _get_model(tag)
        if existing is not None and _latest_tag(mv.name) == str(existing.tag):
            served = from_bentoml_model(existing, uri)
            served.source = "registry"
            return served
        if existing is not None:
            bentoml.models.delete(
                tag
            )  # imported again below, so that `latest` (what `bentoml build` packs) is the served version
        tags = dict(mv.tags or {})
        with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:
            local = _download(uri, _source(mv, store), store, Path(tmp))
            bundle = _load_folder(
                local / BUNDLE_ARTIFACT, uri, local
            )  # loaded before it enters the store: a broken version never does
            normalize = read_preprocess(local / BUNDLE_ARTIFACT)
            info = {"registered_model": mv.name, "version": str(mv.version), "model_uri": uri, "tags": tags}
            labels = {
                "registered_model": mv.name,
                "registry_version": str(mv.version),
                "variant": tags.get("variant", ""),
            }
            with bentoml.models.create(tag, labels=labels, metadata={"model_uri": uri}) as bm:
                shutil.copytree(local / BUNDLE_ARTIFACT, Path(bm.path) / "bundle")
                (Path(bm.path) / INFO_FILE).write_text(json.dumps(info, indent=1))
    return ServedModel(
        bundle,
        uri=uri,
        source="registry",
        name=mv.name,
        version=str(mv.version),
        tags=tags,
        bentoml_model=tag,
        normalize=normalize,
    )


def _get_model(tag: str):
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return bentoml.models.get(tag)
    except NotFound:
        return None


def _latest_tag(name: str) -> str | None:
    m = _get_model(f"{name.lower()}:latest")
    return str(m.tag) if m is not None else None


class _file_lock:
    """An exclusive lock on BentoML's model store for this process and others (workers starting together)."""

    def __enter__(self):
        import fcntl

        from bentoml._internal.configuration.containers import BentoMLContainer

        folder = Path(BentoMLContainer.model_store.get()._path)
        folder.mkdir(parents=True, exist_ok=True)
        self.f = open(folder / ".lmforge.lock", "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def from_bentoml_model(bm, uri: str | None = None) -> ServedModel:
    """A ServedModel from a BentoML model written by `_from_store` (in the local store or a Bento's)."""
    path = Path(bm.path)
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, ValueError):
        raise ModelUnavailable(f"BentoML model {bm.tag}: no readable {INFO_FILE} (not imported by lmforge)") from None
    bundle = _load_folder(path / "bundle", f"BentoML model {bm.tag}")
    return ServedModel(
        bundle,
        uri=uri or info.get("model_uri", ""),
        source="bento",
        name=info["registered_model"],
        version=info["version"],
        tags=info.get("tags") or {},
        bentoml_model=str(bm.tag),
        normalize=read_preprocess(path / "bundle"),
    )


def bento_model() -> ServedModel:
    """The model a built Bento carries (the only `lmforge` model in its store)."""
    import bentoml

    models = [m for m in bentoml.models.list() if (Path(m.path) / INFO_FILE).is_file()]
    if not models:
        raise ModelUnavailable("this Bento carries no lmforge model: build it with `lmforge build` (or `make bento`)")
    return from_bentoml_model(max(models, key=lambda m: m.creation_time))


def open_model(uri: str | None = None, to_store: bool = True) -> ServedModel:
    """The model to serve (see the module docstring): `uri`, else LMFORGE_MODEL_URI, else the Bento's, else @champion.

    Raises:
        ModelUnavailable: one line naming what is wrong and where (a URI from LMFORGE_MODEL_URI is
            shown as `LMFORGE_MODEL_URI=<uri>`).
    """
    env = os.environ.get(MODEL_URI_ENV) if uri is None else None
    if uri is None and not env and IN_BENTO:
        return bento_model()
    uri = uri or default_model_uri()
    try:
        return _open(uri, to_store=to_store)
    except ModelUnavailable as e:
        if env and str(e).startswith(env):
            raise ModelUnavailable(f"{MODEL_URI_ENV}={e}") from None
        raise


# --- inference -------------------------------------------------------------------------------------


def classify(model: ServedModel, texts: list[str]) -> list[dict]:
    """Label, class probabilities and model version of each text (already checked), each normalized first the
    way the clean stage normalized the training texts (a text that would normalize to nothing stays as it is)."""
    if model.normalize is not None:
        texts = [normalize_text(t, **model.normalize) or t for t in texts]
    return [
        {"label": p.label, "probabilities": p.probabilities, "model_version": model.model_version}
        for p in model.bundle.classify(texts)
    ]


@dataclass
class Generated:
    text: str
    finish_reason: str
    """`length` (max_new_tokens reached), `stop` (a stop string) or `eos` (the model ended the text)."""
    tokens: int


def stream(model: ServedModel, req: GenerationRequest) -> Iterator[str]:
    """The continuation of `req.prompt` piece by piece as it is sampled (see `generate`); the last value
    returned by the generator (StopIteration.value) is the Generated summary."""
    check_can_generate(model)
    bundle = model.bundle
    hold = max((len(s) for s in req.stop), default=1) - 1  # characters kept back until no stop string can start in them
    ids, new, sent, reason = bundle.tokenizer.encode(req.prompt).ids or [bundle.eot_id], [], 0, "length"
    text = ""
    for tok in _sample(bundle.lm, ids, req):
        if tok == bundle.eot_id:
            reason = "eos"
            break
        new.append(tok)
        text = bundle.tokenizer.decode(new)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - hold
        while ready > sent and text[ready - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its other bytes
            ready -= 1
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if len(text) > sent:
        yield text[sent:]
    return Generated(text=text, finish_reason=reason, tokens=len(new))


def generate(model: ServedModel, req: GenerationRequest) -> Generated:
    """The whole continuation of `req.prompt` (the prompt is not repeated)."""
    it = stream(model, req)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


@torch.inference_mode()
def _sample(lm, ids: list[int], req: GenerationRequest) -> Iterator[int]:
    """Token ids sampled one at a time: temperature (0: greedy), then top-k, then top-p."""
    gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
    idx = torch.tensor([ids])
    block, vocab = lm.config.block_size, lm.config.vocab_size
    for _ in range(req.max_new_tokens):
        logits = lm(idx[:, -block:])[0][0, -1, :vocab].float()
        if req.temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = (
                logits.double() - logits.max()
            ) / req.temperature  # shifted, in float64: a tiny temperature gives -inf, never NaN
            if req.top_k:
                kth = torch.topk(logits, min(req.top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if req.top_p < 1:
                sorted_p, order = torch.sort(probs, descending=True)
                drop = torch.cumsum(sorted_p, 0) - sorted_p >= req.top_p  # tokens after the nucleus is full
                probs = probs.scatter(0, order[drop], 0.0)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        yield nxt
        idx = torch.cat([idx, torch.tensor([[nxt]])], dim=1)


def describe(model: ServedModel) -> str:
    """One line: what is served (for `lmforge serve` and the logs)."""
    generate_ = "with /generate" if model.bundle.can_generate else "no /generate"
    version = f" ({model.model_version})" if model.version != "local" else ""
    return (
        f"{model.uri}{version}: {model.bundle.variant} classifier over {len(model.bundle.labels)} labels, {generate_}"
    )
