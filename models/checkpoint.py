"""On-disk model format: `model.safetensors` + `config.json` in one directory.

Quantized models store int8 weights with their scales as plain tensors and rebuild the module on
load; nothing is ever unpickled. The `write_*` functions fill a folder; stages call them inside
`tasks.shared.io.atomic_dir`, so a half-written model is never left where a valid one belongs.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, load_model, save_file, save_model

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

# Float classifiers by `kind` in config.json: (config dataclass, module). int8 is "classifier-int8".
CLASSIFIER_KINDS: dict[str, tuple[type, type[nn.Module]]] = {
    "classifier": (ClassifierConfig, TransformerClassifier),
    "classifier-cnn": (CNNConfig, CNNClassifier),
    "classifier-gru": (GRUConfig, GRUClassifier),
}


def _write_config(d: Path, kind: str, config: dict, extra: dict | None) -> None:
    (d / CONFIG).write_text(json.dumps({"kind": kind, "config": config, **(extra or {})}, indent=2))


def read_config(path: Path) -> dict:
    """The JSON config of a saved model directory."""
    f = Path(path) / CONFIG
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: model config not found") from None


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
    meta = read_config(path)
    model = GPT(GPTConfig.from_dict(meta["config"]))
    load_model(model, str(Path(path) / WEIGHTS))
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


def _dynamic_quantize(model: nn.Module, per_channel: bool) -> nn.Module:
    """int8 dynamic quantization of every nn.Linear (torch.ao: deprecated but the fastest CPU path in 2.13)."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)


def _is_dynamic_linear(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") and hasattr(m, "_packed_params")


def quantize_classifier(model: TransformerClassifier, per_channel: bool = True) -> nn.Module:
    """int8 dynamic-quantized copy of a float classifier (weights int8, activations quantized per batch)."""
    import copy

    model = copy.deepcopy(model).eval()
    model.trunk.lm_head = nn.Identity()  # tied to the embedding; the classifier never uses it
    return _dynamic_quantize(model, per_channel)


def write_quantized(qmodel: nn.Module, config: ClassifierConfig, d: Path, per_channel: bool, extra: dict | None = None) -> None:
    """Store int8 weights, scales and zero points as tensors (safetensors) in folder `d`, never packed objects."""
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, m in qmodel.named_modules():
        if _is_dynamic_linear(m):
            w, b = m._weight_bias()
            quantized.add(name)
            tensors[f"{name}.weight_int8"] = w.int_repr().contiguous()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[f"{name}.weight_scale"] = w.q_per_channel_scales().float()
                tensors[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().to(torch.int32)
            else:
                tensors[f"{name}.weight_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
                tensors[f"{name}.weight_zero_point"] = torch.tensor([w.q_zero_point()], dtype=torch.int32)
            if b is not None:
                tensors[f"{name}.bias"] = b.detach().contiguous()
    for name, t in qmodel.state_dict().items():
        if isinstance(t, torch.Tensor) and not t.is_quantized and name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.detach().contiguous()

    save_file(tensors, str(Path(d) / WEIGHTS))
    _write_config(Path(d), "classifier-int8", config.to_dict(), {"per_channel": per_channel, **(extra or {})})


def save_quantized(qmodel: nn.Module, config: ClassifierConfig, path: Path, per_channel: bool, extra: dict | None = None) -> None:
    """`write_quantized` into `path`, created if needed (library use)."""
    write_quantized(qmodel, config, _new_dir(path), per_channel, extra)


def _load_quantized(path: Path, meta: dict) -> nn.Module:
    cfg = ClassifierConfig(**meta["config"])
    model = TransformerClassifier(cfg).eval()
    model.trunk.lm_head = nn.Identity()
    qmodel = _dynamic_quantize(model, meta.get("per_channel", True))
    tensors = load_file(str(Path(path) / WEIGHTS))
    for name, m in qmodel.named_modules():
        if not _is_dynamic_linear(m):
            continue
        keys = [f"{name}.{k}" for k in ("weight_int8", "weight_scale", "weight_zero_point")]
        if any(k not in tensors for k in keys):
            raise ValueError(f"{path}: weights do not match config (missing {[k for k in keys if k not in tensors]})")
        q, scale, zp = (tensors.pop(k) for k in keys)
        want = (m.out_features, m.in_features)
        if tuple(q.shape) != want:
            raise ValueError(f"{path}: weights do not match config ({name}.weight_int8 is {tuple(q.shape)}, config says {want})")
        if meta.get("per_channel", True):
            w = torch._make_per_channel_quantized_tensor(q, scale.double(), zp.long(), 0)
        else:
            w = torch._make_per_tensor_quantized_tensor(q, float(scale), int(zp))
        m.set_weight_bias(w, tensors.pop(f"{name}.bias", None))
    own = {**dict(qmodel.named_parameters()), **dict(qmodel.named_buffers())}
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if unexpected or missing:
        raise ValueError(f"{path}: weights do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t)
    return qmodel


def load_classifier(path: Path) -> nn.Module:
    """Load a classifier directory of any kind (Transformer fp32 or int8, CNN, GRU); returns it in eval mode."""
    meta = read_config(path)
    if meta["kind"] == "classifier-int8":
        return _load_quantized(path, meta)
    if meta["kind"] not in CLASSIFIER_KINDS:
        known = sorted([*CLASSIFIER_KINDS, "classifier-int8"])
        raise ValueError(f"{path}: not a classifier (kind {meta['kind']!r}; known kinds: {', '.join(known)})")
    config_type, module_type = CLASSIFIER_KINDS[meta["kind"]]
    try:
        config = config_type(**meta["config"])
    except TypeError as e:  # a key the config dataclass does not have
        raise ValueError(f"{path}: config does not fit kind {meta['kind']!r}: {e}") from None
    model = module_type(config)
    load_model(model, str(Path(path) / WEIGHTS))
    return model.eval()


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
