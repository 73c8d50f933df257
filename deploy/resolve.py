"""Which model both front ends serve (REST deploy/service.py, gRPC deploy/grpc_server.py), found and loaded in one
place, with what is known about it (registry version, lineage, text normalization).

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

from filelock import FileLock

from deploy.requests import SEARCH_MODES
from models.bundle import Bundle, load_bundle
from models.checkpoint import ArtifactError, write_manifest
from tasks.shared.text import normalize_text

MODEL_URI_ENV = "LMFORGE_MODEL_URI"
"""The model to serve, when set: a bundle folder or an MLflow model URI (see the module docstring)."""
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
"""This code runs from a built Bento (`<bento>/src/deploy/resolve.py` beside `<bento>/bento.yaml`)."""
BENTOML_HOME_ENV = "BENTOML_HOME"
"""BentoML's home folder (its model store is `models/` inside); ~/bentoml when unset."""
STORE_LOCK_FILE = ".lmforge-model-store.lock"
"""In BentoML's home folder: held while a registry version is copied into the model store."""


class ModelUnavailable(Exception):
    """The model to serve cannot be found or loaded; the message is one line naming what and where."""


def _line(e: Exception) -> str:
    """The message of `e` on one line."""
    return " ".join(str(e).split())


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

    @classmethod
    def registered(cls, bundle: Bundle, uri: str, mv, normalize: dict | None, **more) -> "ServedModel":
        """A model version `mv` of the registry, served from `bundle`."""
        return cls(
            bundle,
            uri=uri,
            source="registry",
            name=mv.name,
            version=str(mv.version),
            tags=dict(mv.tags or {}),
            normalize=normalize,
            **more,
        )

    @property
    def model_version(self) -> str:
        """`<name>/<version>` as every response names it."""
        return f"{self.name}/{self.version}"

    def metadata(self) -> dict:
        """Name, version, variant, lineage and test metrics of the served model (GET /metadata)."""
        tags = self.tags
        data = _json_tag(tags, "lineage.inputs")  # the md5 of each data input, as dvc.lock recorded it
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
            "max_length": self.bundle.max_length,
            "context_tokens": self.bundle.lm.config.block_size if self.bundle.lm is not None else None,
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


def _json_tag(tags: dict[str, str], key: str) -> dict:
    """A tag holding a JSON object ({} when absent or unreadable: a version registered by an older lmforge)."""
    try:
        value = json.loads(tags.get(key) or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


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


def download_bundle(uri: str, dst: Path) -> Path:
    """The bundle folder of a registry URI (`models:/<name>@<alias>`, `models:/<name>/<version>`) or any MLflow
    model URI, downloaded under `dst`.

    Raises:
        ModelUnavailable: the registry has no such model, version or alias, or the model is not an lmforge one.
    """
    store = registry_uri()
    mv = registered_version(uri, store)
    return _download(uri, _source(mv, store) if mv is not None else uri, store, Path(dst)) / BUNDLE_ARTIFACT


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
    return ServedModel.registered(bundle, uri, mv, normalize)


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
            # imported again below, so that `latest` (what `bentoml build` packs) is the served version
            bentoml.models.delete(tag)
        tags = dict(mv.tags or {})
        with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:
            local = _download(uri, _source(mv, store), store, Path(tmp))
            # loaded before it enters the store: a broken version never does
            bundle = _load_folder(local / BUNDLE_ARTIFACT, uri, local)
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
    return ServedModel.registered(bundle, uri, mv, normalize, bentoml_model=tag)


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


def _file_lock() -> FileLock:
    """An exclusive lock on BentoML's model store across processes (workers starting together), on a file in
    BentoML's home folder: BENTOML_HOME, else ~/bentoml, as BentoML documents it."""
    home = Path(os.environ.get(BENTOML_HOME_ENV) or Path.home() / "bentoml").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return FileLock(home / STORE_LOCK_FILE)


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


# --- the knowledge-graph task: the extractor and its graph -------------------------------------------

EXTRACTOR_URI_ENV = "LMFORGE_EXTRACTOR_URI"
"""The extractor to serve, when set: an extractor bundle folder (its graph: GRAPH_ENV, else the workspace's), an
MLflow model URI laid out as `lmforge promote` registers it, or `off` (serve classification alone)."""
GRAPH_ENV = "LMFORGE_GRAPH"
"""The N-Triples file /graph/query answers from, when the extractor is a folder (default: the workspace's)."""
EXTRACTOR_MODEL_NAME = "lmforge-extractor"
"""The registered model of the knowledge-graph task (its @champion is served)."""
EXTRACTOR_ARTIFACT = Path("artifacts") / "extractor"
GRAPH_ARTIFACT = Path("artifacts") / "graph" / "graph.nt"
"""Where the extractor bundle and the graph's N-Triples export lie inside a registered extractor version."""


@dataclass
class ServedKG:
    """A loaded extractor and the graph built with it (either may be missing: None)."""

    extractor: object
    graph: Path | None
    uri: str
    source: str
    """`registry` or `folder`."""
    name: str = EXTRACTOR_MODEL_NAME
    version: str = "local"
    tags: dict[str, str] = field(default_factory=dict)
    keep: object = None
    """The temporary folder holding a downloaded version (removed when this object goes)."""

    @property
    def model_version(self) -> str:
        return f"{self.name}/{self.version}"

    def metadata(self) -> dict:
        """What /metadata says about the extractor."""
        return {
            "registered_model": self.name,
            "version": self.version,
            "model_version": self.model_version,
            "source": self.source,
            "model_uri": self.uri,
            "extractor_sha256": getattr(self.extractor, "version", None),
            "entity_labels": list(getattr(self.extractor, "entity_labels", [])),
            "relation_labels": list(getattr(self.extractor, "relation_labels", [])),
            "graph": self.graph is not None,
            "gates": {k[len("gate.") :]: v for k, v in self.tags.items() if k.startswith("gate.")},
        }


def _load_extractor(folder: Path, shown: str):
    """models/extractor.py's bundle at `folder` (torch is imported there)."""
    from models.extractor import load_extractor

    try:
        return load_extractor(folder)
    except ArtifactError as e:
        raise _broken(e, folder, shown) from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelUnavailable(f"{shown}: {_line(e)}") from None


def _workspace_kg() -> tuple[Path, Path] | None:
    """The workspace's extractor folder and graph file (params.yaml's paths.kg_model, paths.kg_graph)."""
    from tasks.kg.rdf import GRAPH_FILE
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError

    try:
        paths = load_params().paths
    except UserError:
        return None
    return Path(paths.kg_model), Path(paths.kg_graph) / GRAPH_FILE


def _kg_folder(folder: Path, graph: Path | None) -> ServedKG:
    extractor = _load_extractor(folder, str(folder))
    return ServedKG(extractor, graph if graph is not None and graph.is_file() else None, str(folder), "folder")


def _kg_registry(uri: str) -> ServedKG:
    store = registry_uri()
    mv = registered_version(uri, store)
    tmp = tempfile.TemporaryDirectory(prefix="lmforge-kg-")  # the graph file stays for the query workers
    from mlflow.exceptions import MlflowException

    import mlflow

    source = _source(mv, store) if mv is not None else uri
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp.name, tracking_uri=store))
    except (MlflowException, OSError) as e:
        raise ModelUnavailable(f"{uri}: {_line(e)} (MLflow store {store})") from None
    if not (local / EXTRACTOR_ARTIFACT).is_dir():
        raise ModelUnavailable(f"{uri}: not an lmforge extractor (no {EXTRACTOR_ARTIFACT.as_posix()})")
    extractor = _load_extractor(local / EXTRACTOR_ARTIFACT, uri)
    graph = local / GRAPH_ARTIFACT
    served = ServedKG(extractor, graph if graph.is_file() else None, uri, "registry", keep=tmp)
    if mv is not None:
        served.name, served.version, served.tags = mv.name, str(mv.version), dict(mv.tags or {})
    return served


def _registered_name(field: str, default: str) -> str:
    """params.yaml's `tracking.<field>` (a task's registered model name; `default` outside a project)."""
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError

    try:
        return getattr(load_params().tracking, field)
    except UserError:
        return default


def open_kg() -> ServedKG | None:
    """The knowledge-graph task to serve: LMFORGE_EXTRACTOR_URI, else `lmforge-extractor@champion`, else the
    workspace's extractor and graph; None when there is none (or LMFORGE_EXTRACTOR_URI=off): classification alone.

    Raises:
        ModelUnavailable: an extractor was named or found but cannot be loaded (one line naming what and where).
    """
    env = os.environ.get(EXTRACTOR_URI_ENV, "").strip()
    graph_env = Path(os.environ[GRAPH_ENV]) if os.environ.get(GRAPH_ENV) else None
    if env.lower() == "off":
        return None
    if env:
        if _is_path(env):
            if not Path(env).is_dir():
                raise ModelUnavailable(f"{EXTRACTOR_URI_ENV}={env}: no such folder or model URI")
            return _kg_folder(Path(env), graph_env or (_workspace_kg() or (None, None))[1])
        return _kg_registry(env)
    if not IN_BENTO:
        try:
            return _kg_registry(f"models:/{_registered_name('extractor_model', EXTRACTOR_MODEL_NAME)}@champion")
        except ModelUnavailable as e:
            if "no registered model" not in str(e) and "not set" not in str(e):
                raise
    workspace = None if IN_BENTO else _workspace_kg()
    if workspace is None or not workspace[0].is_dir():
        return None
    return _kg_folder(workspace[0], graph_env or workspace[1])


# --- the alignment task: the encoder and its search index --------------------------------------------

ENCODER_URI_ENV = "LMFORGE_ENCODER_URI"
"""The encoder to serve, when set: an encoder bundle folder (its index: INDEX_ENV, else the workspace's), an MLflow
model URI laid out as `lmforge promote` registers it, or `off` (no /search and /embed)."""
INDEX_ENV = "LMFORGE_INDEX_PATH"
"""The index folder /search answers from, when the encoder is a folder (default: the workspace's paths.align_index)."""
ENCODER_MODEL_NAME = "lmforge-encoder"
"""The registered model of the alignment task (its @champion is served)."""
ENCODER_ARTIFACT = Path("artifacts") / "encoder"
INDEX_ARTIFACT = Path("artifacts") / "index"
"""Where the encoder bundle and the index folder lie inside a registered encoder version."""
DEFAULT_SEARCH_MODE = "hybrid"
"""The mode /search uses when a request names none and the registered version has no `served_mode` tag (a folder)."""


@dataclass
class ServedSearch:
    """A loaded encoder and the search index built with it."""

    encoder: object
    """models/dual_encoder.py's Encoder: `embed(texts, kind)`, `dim`, `version` (sha256 of its weights)."""
    index: object
    """models/search_index.py's SearchIndex over the items, embedded by this encoder."""
    uri: str
    source: str
    """`registry` or `folder`."""
    name: str = ENCODER_MODEL_NAME
    version: str = "local"
    tags: dict[str, str] = field(default_factory=dict)
    served_mode: str = DEFAULT_SEARCH_MODE
    """The mode /search uses unless a request names one: the registered version's `served_mode` tag (what the
    evaluation found best), else hybrid."""

    @property
    def model_version(self) -> str:
        return f"{self.name}/{self.version}"

    def metadata(self) -> dict:
        """What /metadata says about the encoder and its index."""
        index = self.index
        return {
            "registered_model": self.name,
            "version": self.version,
            "model_version": self.model_version,
            "source": self.source,
            "model_uri": self.uri,
            "encoder_sha256": getattr(self.encoder, "version", None),
            "dim": getattr(self.encoder, "dim", None),
            "served_mode": self.served_mode,
            "index": {
                "backend": getattr(index, "backend", None),
                "items": len(index.items),
                "size_mb": _size_mb(getattr(index, "meta", {})),
                "params": getattr(index, "meta", {}).get("params"),
                "encoder_sha256": getattr(index, "encoder_version", None),
            },
            "gates": {k[len("gate.") :]: v for k, v in self.tags.items() if k.startswith("gate.")},
        }


def _size_mb(meta: dict) -> float | None:
    """The index folder's size in MiB from the file sizes its index.json records (None when it records none)."""
    files = meta.get("files")
    return round(sum(f["size"] for f in files.values()) / 2**20, 2) if files else None


def _load_search(encoder_dir: Path, index_dir: Path, shown: str) -> tuple[object, object]:
    """models/dual_encoder.py's encoder and models/search_index.py's index (torch is imported there); the index must
    have been built with this encoder."""
    from models.dual_encoder import load_encoder
    from models.search_index import SearchIndex

    if not index_dir.is_dir():
        raise ModelUnavailable(f"{shown}: no index folder {index_dir} (run the align_index stage)")
    try:
        encoder = load_encoder(encoder_dir)
        index = SearchIndex.load(index_dir)
    except ArtifactError as e:
        root = encoder_dir if e.file.is_relative_to(encoder_dir) else index_dir
        raise _broken(e, root, shown) from None
    except (OSError, ValueError, KeyError) as e:
        raise ModelUnavailable(f"{shown}: {_line(e)}") from None
    if index.encoder_version != encoder.version:  # vectors of another encoder: every dense answer would be noise
        raise ModelUnavailable(
            f"{shown}: the index was built with encoder {index.encoder_version[:12]}, not this one "
            f"({encoder.version[:12]}): rebuild it (align_index)"
        )
    return encoder, index


def search_folder(encoder_dir: Path, index_dir: Path) -> ServedSearch:
    """An encoder bundle folder and its index folder, loaded and checked as the servers load them (the promotion's
    smoke test loads a candidate this way).

    Raises:
        ModelUnavailable: a file is missing or broken, or the index was built with another encoder (one line).
    """
    shown = str(encoder_dir)
    return ServedSearch(*_load_search(Path(encoder_dir), Path(index_dir), shown), shown, "folder")


def _search_mode(tags: dict[str, str], shown: str) -> str:
    mode = tags.get("served_mode") or DEFAULT_SEARCH_MODE
    if mode not in SEARCH_MODES:
        raise ModelUnavailable(f"{shown}: tag served_mode={mode!r} is not one of {', '.join(SEARCH_MODES)}")
    return mode


def _search_registry(uri: str) -> ServedSearch:
    from mlflow.exceptions import MlflowException

    import mlflow

    store = registry_uri()
    mv = registered_version(uri, store)
    source = _source(mv, store) if mv is not None else uri
    with tempfile.TemporaryDirectory(prefix="lmforge-align-") as tmp:  # both are read into memory
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=store))
        except (MlflowException, OSError) as e:
            raise ModelUnavailable(f"{uri}: {_line(e)} (MLflow store {store})") from None
        if not (local / ENCODER_ARTIFACT).is_dir():
            raise ModelUnavailable(f"{uri}: not an lmforge encoder (no {ENCODER_ARTIFACT.as_posix()})")
        encoder, index = _load_search(local / ENCODER_ARTIFACT, local / INDEX_ARTIFACT, uri)
    served = ServedSearch(encoder, index, uri, "registry")
    if mv is not None:
        served.name, served.version, served.tags = mv.name, str(mv.version), dict(mv.tags or {})
        served.served_mode = _search_mode(served.tags, uri)
    return served


def _workspace_search() -> tuple[Path, Path] | None:
    """The workspace's encoder and index folders (params.yaml's paths.align_model, paths.align_index)."""
    from tasks.shared.config.params import load_params
    from tasks.shared.errors import UserError

    try:
        paths = load_params().paths
    except UserError:
        return None
    return Path(paths.align_model), Path(paths.align_index)


def open_search() -> ServedSearch | None:
    """The alignment task to serve: LMFORGE_ENCODER_URI, else `lmforge-encoder@champion`, else the workspace's
    encoder and index; None when there is none (or LMFORGE_ENCODER_URI=off): /search and /embed answer 404 then.

    Raises:
        ModelUnavailable: an encoder was named or found but cannot be loaded, or its index is missing or was built
            with another encoder (one line naming what and where).
    """
    env = os.environ.get(ENCODER_URI_ENV, "").strip()
    index_env = Path(os.environ[INDEX_ENV]) if os.environ.get(INDEX_ENV) else None
    if env.lower() == "off":
        return None
    if env:
        if not _is_path(env):
            return _search_registry(env)
        if not Path(env).is_dir():
            raise ModelUnavailable(f"{ENCODER_URI_ENV}={env}: no such folder or model URI")
        index = index_env or (_workspace_search() or (None, None))[1]
        if index is None:
            raise ModelUnavailable(f"{ENCODER_URI_ENV}={env}: no index: set {INDEX_ENV} to the index folder")
        return ServedSearch(*_load_search(Path(env), index, f"{ENCODER_URI_ENV}={env}"), env, "folder")
    if not IN_BENTO:
        try:
            return _search_registry(f"models:/{_registered_name('encoder_model', ENCODER_MODEL_NAME)}@champion")
        except ModelUnavailable as e:
            if "no registered model" not in str(e) and "not set" not in str(e):
                raise
    workspace = None if IN_BENTO else _workspace_search()
    if workspace is None or not workspace[0].is_dir():
        return None
    return search_folder(workspace[0], index_env or workspace[1])
