"""On-disk model format: `model.safetensors` + `config.json` in one directory.

Quantized models (`models.quantize`) store int8 weights with their scales as plain tensors and rebuild
the module on load; nothing is ever unpickled. The `write_*` functions fill a folder; stages call them inside
`tasks.shared.io.atomic_dir`, so a half-written model is never left where a valid one belongs.
A folder that is copied on (a bundle, a training checkpoint) carries a `manifest.json` with the size
and sha256 of every file, checked before loading. A missing, truncated or corrupt file is always an
`ArtifactError` naming the file, never a raw safetensors or JSON error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.classifier import ClassifierConfig, TransformerClassifier
from models.errors import ArtifactError
from models.files import file_sha256
from models.transformer import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"

# Float classifiers by `kind` in config.json: (config dataclass, module). int8 is "classifier-int8".
CLASSIFIER_KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "classifier": (ClassifierConfig, TransformerClassifier),
    "classifier-cnn": (CNNConfig, CNNClassifier),
    "classifier-gru": (GRUConfig, GRUClassifier),
}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def load_json(file: Path, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in `file`, which must hold `keys`."""
    file = Path(file)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(file, "missing") from None
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ArtifactError(file, f"not valid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict) or (missing := [k for k in keys if k not in data]):
        raise ArtifactError(file, f"no {', '.join(missing) if isinstance(data, dict) else 'JSON object'} entry")
    return data


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    file = Path(file)
    if not file.is_file():
        raise ArtifactError(file, "missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise ArtifactError(file, f"not a readable safetensors file ({_one_line(e)})") from None


def write_manifest(folder: Path) -> None:
    """Record the size and sha256 of every file under `folder` in `folder/manifest.json`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps({"files": entries}, indent=2))


def verify_manifest(folder: Path) -> bool:
    """Check every file that `folder/manifest.json` lists; False when there is no manifest (older folders).

    Raises:
        ArtifactError: naming the first file that is missing, truncated or altered.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return False
    files = load_json(folder / MANIFEST, ("files",))["files"]
    for rel, want in files.items():
        f = folder / rel
        try:
            size, digest = int(want["size"]), str(want["sha256"])
        except (TypeError, KeyError, ValueError):
            raise ArtifactError(folder / MANIFEST, f"malformed entry for {rel}") from None
        if not f.is_file():
            raise ArtifactError(f, "missing")
        if (actual := f.stat().st_size) != size:
            problem = "truncated" if actual < size else "wrong size"
            raise ArtifactError(f, f"{problem} ({actual} bytes, {size} expected)")
        if file_sha256(f) != digest:
            raise ArtifactError(f, "corrupt (sha256 mismatch)")
    return True


def _write_config(d: Path, kind: str, config: dict, extra: dict | None) -> None:
    (d / CONFIG).write_text(json.dumps({"kind": kind, "config": config, **(extra or {})}, indent=2))


def read_config(path: Path) -> dict:
    """The JSON config of a saved model directory (with its `kind` and `config` entries)."""
    f = Path(path) / CONFIG
    if not f.exists():
        raise ArtifactError(f, "model config not found")
    meta = load_json(f, ("kind", "config"))
    if not isinstance(meta["kind"], str):
        raise ArtifactError(f, f"kind {meta['kind']!r} is not a name")
    return meta


def _load_weights(model: nn.Module, path: Path) -> None:
    """Fill `model` from `path/model.safetensors` (strict: every tensor, right shapes)."""
    tensors = load_tensors(Path(path) / WEIGHTS)
    named = model.state_dict(keep_vars=True)
    for name, p in named.items():  # a tied weight is stored once, under one of its names
        if name not in tensors and (twin := next((o for o, q in named.items() if q is p and o in tensors), None)):
            tensors[name] = tensors[twin]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ArtifactError(Path(path) / WEIGHTS, f"weights do not match {CONFIG} ({_one_line(e)})") from None


def _config(config_type: type, meta: dict, path: Path):
    """`config_type` built from the `config` entry of a model folder's config.json."""
    build = getattr(config_type, "from_dict", None) or (lambda d: config_type(**d))
    try:
        return build(meta["config"])
    except (TypeError, ValueError, AttributeError) as e:  # a key the dataclass does not have, a bad value
        raise ArtifactError(Path(path) / CONFIG, f"config does not fit kind {meta['kind']!r}: {e}") from None


def write_lm(model: GPT, d: Path, extra: dict | None = None) -> None:
    """Write weights + config into folder `d`."""
    save_model(model, str(Path(d) / WEIGHTS))  # handles the tied wte/lm_head weight
    _write_config(Path(d), "gpt", model.config.to_dict(), extra)


def _new_dir(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_lm(model: GPT, path: Path, extra: dict | None = None) -> None:
    """`write_lm` into `path`, created if needed (library use; stages write through an atomic folder)."""
    write_lm(model, _new_dir(path), extra)


def load_lm(path: Path) -> GPT:
    """Load a language-model directory; returns it in eval mode."""
    meta = read_config(path)
    model = GPT(_config(GPTConfig, meta, path))
    _load_weights(model, path)
    return model.eval()


def classifier_kind(model: nn.Module) -> str:
    """The `kind` a float classifier is saved under."""
    for kind, (_, module_type) in CLASSIFIER_KINDS.items():
        if type(model) is module_type:
            return kind
    raise TypeError(f"no checkpoint kind for {type(model).__name__}")


def write_classifier(model: nn.Module, d: Path, extra: dict | None = None) -> None:
    """Write a float classifier (Transformer, CNN or GRU) into folder `d` (not atomic)."""
    kind = classifier_kind(model)
    save_model(model, str(Path(d) / WEIGHTS))
    _write_config(Path(d), kind, model.config.to_dict(), extra)


def save_classifier(model: nn.Module, path: Path, extra: dict | None = None) -> None:
    """`write_classifier` into `path`, created if needed (library use)."""
    write_classifier(model, _new_dir(path), extra)


def load_classifier(path: Path) -> nn.Module:
    """Load a classifier directory of any kind (Transformer fp32 or int8, CNN, GRU); returns it in eval mode."""
    meta = read_config(path)
    if meta["kind"] == "classifier-int8":
        from models.quantize import load_quantized  # models.quantize imports this module

        return load_quantized(path, meta)
    if meta["kind"] not in CLASSIFIER_KINDS:
        known = sorted([*CLASSIFIER_KINDS, "classifier-int8"])
        raise ArtifactError(
            Path(path) / CONFIG, f"not a classifier (kind {meta['kind']!r}; known kinds: {', '.join(known)})"
        )
    config_type, module_type = CLASSIFIER_KINDS[meta["kind"]]
    model = module_type(_config(config_type, meta, path))
    _load_weights(model, path)
    return model.eval()


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
