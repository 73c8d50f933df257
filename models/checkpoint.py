"""On-disk model format of every kind: `model.safetensors` + `config.json` in one directory.

`config.json` holds the `kind` ("gpt", "classifier", "classifier-cnn", "classifier-gru", "classifier-int8", "onnx"), the
model's `config` and any extra entries (max_length, lineage). An int8 classifier (quantized by `models.quantize`)
stores, for every int8 Linear `name`, `{name}.weight_int8` (int8, out x in), `{name}.weight_scale` (float32, (out,)
per channel or (1,) per tensor), `{name}.weight_zero_point` (int32, same shape) and `{name}.bias`; every other
tensor under its state_dict name; config.json records the `backend` and `per_channel`. Loading rebuilds the module
from config.json and fills it through public APIs; nothing is ever unpickled.

The `write_*` functions fill a folder; stages call them inside `tasks.shared.io.atomic_dir`, so a half-written
model is never left where a valid one belongs.
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
from safetensors.torch import load_file, save_file, save_model

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.classifier import ClassifierConfig, TransformerClassifier
from models.errors import ArtifactError
from models.files import file_sha256
from models.onnx_runtime import ONNX_KIND, load_onnx_classifier
from models.quantize import (
    BACKENDS,
    SYMMETRIC_BACKENDS,
    Int8Weight,
    check_backend,
    int8_linears,
    int8_weight,
    quantize_linears,
    set_int8_weight,
)
from models.transformer import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "manifest.json"
INT8_KIND = "classifier-int8"
INT8_PARTS = ("weight_int8", "weight_scale", "weight_zero_point")
"""The tensors stored for an int8 Linear `name`: `{name}.{part}` for Int8Weight's values, scale and zero_point
(and `{name}.bias`)."""

# Float classifiers by `kind` in config.json: (config dataclass, module). int8 is INT8_KIND.
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


def load_weights(model: nn.Module, path: Path) -> None:
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
    load_weights(model, path)
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
    """Load a classifier directory of any kind (Transformer fp32 or int8, CNN, GRU, or an ONNX graph run by ONNX
    Runtime: models/onnx_runtime.py); returns it in eval mode."""
    meta = read_config(path)
    if meta["kind"] == INT8_KIND:
        return _load_int8(path, meta)
    if meta["kind"] == ONNX_KIND:
        return load_onnx_classifier(path, meta, _config(ClassifierConfig, meta, path))
    if meta["kind"] not in CLASSIFIER_KINDS:
        known = sorted([*CLASSIFIER_KINDS, INT8_KIND, ONNX_KIND])
        raise ArtifactError(
            Path(path) / CONFIG, f"not a classifier (kind {meta['kind']!r}; known kinds: {', '.join(known)})"
        )
    config_type, module_type = CLASSIFIER_KINDS[meta["kind"]]
    model = module_type(_config(config_type, meta, path))
    load_weights(model, path)
    return model.eval()


# --------------------------------------------------------------------------------------------- int8
def write_quantized(
    qmodel: nn.Module, config: ClassifierConfig, d: Path, backend: str, per_channel: bool, extra: dict | None = None
) -> None:
    """Store int8 weights, scales and zero points as plain tensors (safetensors) in folder `d`, never packed objects.

    Args:
        qmodel: a `models.quantize.quantize_classifier` result (either backend; both write the same tensors).
        config: the classifier's config, written to config.json.
        d: an existing folder (stages pass an atomic one).
        backend: the backend that quantized `qmodel`, recorded so that loading uses it again.
        per_channel: whether the weights have one scale per output channel.
        extra: more config.json entries (max_length, lineage).
    """
    check_backend(backend)
    linears = int8_linears(qmodel)
    if not linears:
        raise ValueError("no int8 Linear in the model; quantize it with quantize_classifier first")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in linears.items():
        weight = int8_weight(m)
        for part, t in zip(INT8_PARTS, (weight.values, weight.scale, weight.zero_point)):
            tensors[f"{name}.{part}"] = t.contiguous()
        if weight.bias is not None:
            tensors[f"{name}.bias"] = weight.bias.detach().contiguous()
    for name, t in qmodel.state_dict().items():
        if isinstance(t, torch.Tensor) and not t.is_quantized and name.rsplit(".", 1)[0] not in linears:
            tensors[name] = t.detach().contiguous()
    save_file(tensors, str(Path(d) / WEIGHTS))
    _write_config(
        Path(d), INT8_KIND, config.to_dict(), {"backend": backend, "per_channel": per_channel, **(extra or {})}
    )


def save_quantized(
    qmodel: nn.Module, config: ClassifierConfig, path: Path, backend: str, per_channel: bool, extra: dict | None = None
) -> None:
    """`write_quantized` into `path`, created if needed (library use)."""
    write_quantized(qmodel, config, _new_dir(path), backend, per_channel, extra)


def load_quantized(path: Path, backend: str | None = None) -> nn.Module:
    """Rebuild an int8 classifier folder (kind "classifier-int8"); returns it in eval mode.

    Args:
        path: the model folder.
        backend: quantize with this backend instead of the one config.json records ("torch.ao" when it records none).

    Raises:
        ArtifactError: naming the file whose tensors are missing, mis-shaped or disagree with config.json.
    """
    meta = read_config(path)
    if meta["kind"] != INT8_KIND:
        raise ArtifactError(Path(path) / CONFIG, f"not an int8 classifier (kind {meta['kind']!r})")
    return _load_int8(path, meta, backend)


def _int8_settings(path: Path, meta: dict, backend: str | None) -> tuple[str, bool]:
    """(backend, per_channel) to rebuild an int8 folder with: config.json's, or `backend` when one is given."""
    stored = meta.get("backend", "torch.ao")  # folders written before there were two backends
    if stored not in BACKENDS:
        raise ArtifactError(Path(path) / CONFIG, f"unknown int8 backend {stored!r} (known: {', '.join(BACKENDS)})")
    if backend is not None:
        check_backend(backend)
    per_channel = meta.get("per_channel", True)
    if not isinstance(per_channel, bool):
        raise ArtifactError(Path(path) / CONFIG, f"per_channel {per_channel!r} is not true or false")
    return backend or stored, per_channel


def _load_int8(path: Path, meta: dict, backend: str | None = None) -> nn.Module:
    """An int8 classifier rebuilt from config.json (`meta`) and filled with the folder's tensors."""
    backend, per_channel = _int8_settings(path, meta, backend)
    model = TransformerClassifier(_config(ClassifierConfig, meta, path)).eval()
    model.trunk.lm_head = nn.Identity()
    qmodel = quantize_linears(model, backend, per_channel)
    file = Path(path) / WEIGHTS
    tensors = load_tensors(file)
    linears = int8_linears(qmodel)
    with torch.no_grad():
        for name, m in linears.items():
            weight = _stored_int8_weight(file, tensors, name, m, per_channel)
            if backend in SYMMETRIC_BACKENDS and weight.zero_point.any():
                raise ArtifactError(
                    file, f"{name}.weight_zero_point is not all zero; {backend} int8 weights are symmetric"
                )
            set_int8_weight(m, weight, per_channel)
            if not torch.equal(int8_weight(m).values, weight.values):
                raise ArtifactError(
                    file, f"{name}.weight_scale and {name}.weight_zero_point do not reproduce {name}.weight_int8"
                )
        _fill_float_tensors(file, qmodel, tensors, set(linears))
    return qmodel.eval()


def _stored_int8_weight(
    file: Path, tensors: dict[str, torch.Tensor], name: str, m: nn.Module, per_channel: bool
) -> Int8Weight:
    """Take int8 Linear `name`'s tensors out of `tensors`, checked against the shapes of its rebuilt module `m`."""
    keys = [f"{name}.{part}" for part in INT8_PARTS]
    if any(k not in tensors for k in keys):
        raise ArtifactError(file, f"weights do not match config (missing {[k for k in keys if k not in tensors]})")
    q, scale, zp = (tensors.pop(k) for k in keys)
    want = (m.out_features, m.in_features)
    if tuple(q.shape) != want or q.dtype != torch.int8:
        got = f"{str(q.dtype).removeprefix('torch.')} {tuple(q.shape)}"
        raise ArtifactError(file, f"weights do not match config ({name}.weight_int8 is {got}, config says int8 {want})")
    n = want[0] if per_channel else 1
    for key, t in ((keys[1], scale), (keys[2], zp)):
        if tuple(t.shape) != (n,):
            granularity = "per-channel" if per_channel else "per-tensor"
            raise ArtifactError(
                file, f"weights do not match config ({key} is {tuple(t.shape)}, {granularity} int8 needs ({n},))"
            )
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ArtifactError(file, f"{keys[1]} holds zero, negative or non-finite scales")
    if ((zp < -128) | (zp > 127)).any():
        raise ArtifactError(file, f"{keys[2]} holds values outside the int8 range")
    bias, own_bias = tensors.pop(f"{name}.bias", None), int8_weight(m).bias
    if (bias is None) != (own_bias is None) or (bias is not None and bias.shape != own_bias.shape):
        got = "missing" if bias is None else f"{tuple(bias.shape)}"
        need = "none" if own_bias is None else f"{tuple(own_bias.shape)}"
        raise ArtifactError(file, f"weights do not match config ({name}.bias is {got}, config says {need})")
    return Int8Weight(q, scale, zp, bias)


def _fill_float_tensors(file: Path, qmodel: nn.Module, tensors: dict[str, torch.Tensor], int8: set[str]) -> None:
    """Copy the stored float tensors (all but the int8 Linears') into `qmodel`; every one must be there, no more."""
    own = {n: t for n, t in [*qmodel.named_parameters(), *qmodel.named_buffers()] if n.rsplit(".", 1)[0] not in int8}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if unexpected or missing:
        raise ArtifactError(file, f"weights do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise ArtifactError(
                file, f"weights do not match config ({name} is {tuple(t.shape)}, config says {tuple(own[name].shape)})"
            )
        own[name].copy_(t)


def dir_size_mb(path: Path) -> float:
    """Size in MiB of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
