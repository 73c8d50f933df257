"""int8 quantization of a Transformer classifier with two backends, saved as plain tensors.

`torch.ao` is `quantize_dynamic` (fbgemm kernels; deprecated, yet the fastest eager-mode CPU path in torch 2.13);
`torchao` is `quantize_` with `Int8DynamicActivationInt8WeightConfig` (`Int8Tensor` weights, the maintained path,
built for torch.compile and GPUs). Activations are quantized per batch in both, weights are symmetric int8.

Both backends write ONE format: for every quantized Linear `name`, `{name}.weight_int8` (int8, out x in),
`{name}.weight_scale` (float32, (out,) per channel or (1,) per tensor), `{name}.weight_zero_point` (int32, same
shape) and `{name}.bias`; every other tensor under its state_dict name. So a folder written with one backend loads
with the other. Loading rebuilds the module from config.json and fills it through public APIs; nothing is unpickled.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from models.checkpoint import CONFIG, WEIGHTS, ArtifactError, _config, _new_dir, _write_config, load_tensors
from models.classifier import ClassifierConfig, TransformerClassifier

BACKENDS = ("torch.ao", "torchao")
"""int8 backends: torch.ao `quantize_dynamic` and torchao `quantize_`."""

# Importing torchao on a CPU-only machine logs that its CUDA kernel libraries and triton are missing (logger
# "torchao") and torch warns about its Enum pytree registration (logger "torch.utils._pytree"): noise, not problems.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


class BackendChoice(NamedTuple):
    """The faster int8 backend on this machine, and the measurements behind the choice."""

    backend: str
    """The backend to use (one of BACKENDS)."""
    ms: dict[str, float]
    """Median forward time in ms of every backend that ran."""
    errors: dict[str, str]
    """Why a backend could not be measured (import or run failure), one line each."""

    @property
    def reason(self) -> str:
        """One line saying why `backend` was chosen."""
        timed = " < ".join(f"{b} {ms:.2f} ms" for b, ms in sorted(self.ms.items(), key=lambda kv: kv[1]))
        return "; ".join(
            [f"forward on the sample batch: {timed}", *(f"{b} failed: {e}" for b, e in self.errors.items())]
        )


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"int8 backend must be one of {BACKENDS}, got {backend!r}")


def _torchao():
    """`torchao.quantization`, imported without the log lines it prints on a machine without CUDA kernels."""
    loggers = [logging.getLogger(n) for n in _IMPORT_NOISE]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao.quantization


def _quantize(model: nn.Module, backend: str, per_channel: bool) -> nn.Module:
    """int8 every nn.Linear of `model` (in place for torchao, a new module for torch.ao)."""
    if backend == "torch.ao":
        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            return quantize_dynamic(model, {nn.Linear: qconfig}, dtype=torch.qint8)
    tq = _torchao()
    # activations per token (each example quantized on its own), weights per output channel or per tensor;
    # set_inductor_config=False: do not change global torch._inductor settings for an eager model
    granularity = [tq.PerRow(), tq.PerRow() if per_channel else tq.PerTensor()]
    tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig(granularity=granularity, set_inductor_config=False))
    return model


def _int8_backend(m: nn.Module) -> str | None:
    """The backend that quantized module `m`, or None when `m` is not an int8 Linear."""
    if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") and hasattr(m, "_packed_params"):
        return "torch.ao"
    if isinstance(m, nn.Linear) and type(m.weight).__module__.startswith("torchao") and hasattr(m.weight, "qdata"):
        return "torchao"
    return None


def _int8_tensors(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 weight, float32 scales, int32 zero points, bias) of an int8 Linear, in the on-disk layout."""
    if _int8_backend(m) == "torch.ao":
        w, b = m.weight(), m.bias()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zp = w.q_per_channel_scales().float(), w.q_per_channel_zero_points().to(torch.int32)
        else:
            scale, zp = (
                torch.tensor([w.q_scale()], dtype=torch.float32),
                torch.tensor([w.q_zero_point()], dtype=torch.int32),
            )
        return w.int_repr(), scale, zp, b
    w = m.weight
    zp = w.zero_point if w.zero_point is not None else torch.zeros_like(w.scale)
    return w.qdata, w.scale.reshape(-1).float(), zp.reshape(-1).to(torch.int32), m.bias


def quantize_classifier(model: nn.Module, backend: str = "torch.ao", per_channel: bool = True) -> nn.Module:
    """int8 copy of a float classifier: every nn.Linear gets int8 weights, activations are quantized per batch.

    Args:
        model: the float classifier; left untouched.
        backend: "torch.ao" (quantize_dynamic) or "torchao" (quantize_ with Int8DynamicActivationInt8WeightConfig).
        per_channel: one weight scale per output channel; False = one per tensor.
    """
    _check_backend(backend)
    model = copy.deepcopy(model).eval()
    if hasattr(model, "trunk"):
        model.trunk.lm_head = nn.Identity()  # tied to the embedding; the classifier never uses it
    return _quantize(model, backend, per_channel)


def write_quantized(
    qmodel: nn.Module, config: ClassifierConfig, d: Path, backend: str, per_channel: bool, extra: dict | None = None
) -> None:
    """Store int8 weights, scales and zero points as plain tensors (safetensors) in folder `d`, never packed objects.

    Args:
        qmodel: a `quantize_classifier` result (either backend; both write the same tensors).
        config: the classifier's config, written to config.json.
        d: an existing folder (stages pass an atomic one).
        backend: the backend that quantized `qmodel`, recorded so that loading uses it again.
        per_channel: whether the weights have one scale per output channel.
        extra: more config.json entries (max_length, lineage).
    """
    _check_backend(backend)
    tensors: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, m in qmodel.named_modules():
        if _int8_backend(m) is None:
            continue
        q, scale, zp, b = _int8_tensors(m)
        quantized.add(name)
        tensors[f"{name}.weight_int8"] = q.contiguous()
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_zero_point"] = zp.contiguous()
        if b is not None:
            tensors[f"{name}.bias"] = b.detach().contiguous()
    if not quantized:
        raise ValueError("no int8 Linear in the model; quantize it with quantize_classifier first")
    for name, t in qmodel.state_dict().items():
        if isinstance(t, torch.Tensor) and not t.is_quantized and name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.detach().contiguous()

    save_file(tensors, str(Path(d) / WEIGHTS))
    _write_config(
        Path(d), "classifier-int8", config.to_dict(), {"backend": backend, "per_channel": per_channel, **(extra or {})}
    )


def save_quantized(
    qmodel: nn.Module, config: ClassifierConfig, path: Path, backend: str, per_channel: bool, extra: dict | None = None
) -> None:
    """`write_quantized` into `path`, created if needed (library use)."""
    write_quantized(qmodel, config, _new_dir(path), backend, per_channel, extra)


def _fill_torch_ao(m: nn.Module, q, scale, zp, bias, per_channel: bool, file: Path, name: str) -> None:
    """Set the weight of a torch.ao dynamic Linear from stored int8 values (public quantize_per_* APIs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        if per_channel:  # dequantize, then quantize again with the same scales: gives back exactly q
            w = torch.quantize_per_channel(
                (q.float() - zp.float()[:, None]) * scale[:, None], scale.double(), zp.long(), 0, torch.qint8
            )
        else:
            w = torch.quantize_per_tensor((q.float() - zp.float()) * scale, float(scale), int(zp), torch.qint8)
    if not torch.equal(w.int_repr(), q):
        raise ArtifactError(
            file, f"{name}.weight_scale and {name}.weight_zero_point do not reproduce {name}.weight_int8"
        )
    m.set_weight_bias(w, bias)


def _fill_torchao(m: nn.Module, q, scale, zp, bias, file: Path, name: str) -> None:
    """Copy stored int8 values into the `Int8Tensor` weight of a torchao-quantized Linear."""
    if zp.any():
        raise ArtifactError(file, f"{name}.weight_zero_point is not all zero; torchao int8 weights are symmetric")
    w = m.weight
    w.qdata.copy_(q)
    w.scale.copy_(scale.reshape(w.scale.shape))
    if w.zero_point is not None:
        w.zero_point.zero_()
    if bias is not None:
        m.bias.copy_(bias)


def load_quantized(path: Path, meta: dict, backend: str | None = None) -> nn.Module:
    """Rebuild an int8 classifier folder (kind "classifier-int8"); returns it in eval mode.

    Args:
        path: the model folder.
        meta: its config.json (`models.checkpoint.read_config`).
        backend: quantize with this backend instead of the one config.json records ("torch.ao" when it records none).

    Raises:
        ArtifactError: naming the file whose tensors are missing, mis-shaped or disagree with config.json.
    """
    stored = meta.get("backend", "torch.ao")  # folders written before there were two backends
    if stored not in BACKENDS:
        raise ArtifactError(Path(path) / CONFIG, f"unknown int8 backend {stored!r} (known: {', '.join(BACKENDS)})")
    if backend is not None:
        _check_backend(backend)
    backend = backend or stored
    per_channel = meta.get("per_channel", True)
    if not isinstance(per_channel, bool):
        raise ArtifactError(Path(path) / CONFIG, f"per_channel {per_channel!r} is not true or false")

    model = TransformerClassifier(_config(ClassifierConfig, meta, path)).eval()
    model.trunk.lm_head = nn.Identity()
    qmodel = _quantize(model, backend, per_channel)
    file = Path(path) / WEIGHTS
    tensors = load_tensors(file)
    quantized = set()
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if _int8_backend(m) is None:
                continue
            quantized.add(name)
            keys = [f"{name}.{k}" for k in ("weight_int8", "weight_scale", "weight_zero_point")]
            if any(k not in tensors for k in keys):
                raise ArtifactError(
                    file, f"weights do not match config (missing {[k for k in keys if k not in tensors]})"
                )
            q, scale, zp = (tensors.pop(k) for k in keys)
            _, _, _, own_bias = _int8_tensors(m)
            want = (m.out_features, m.in_features)
            if tuple(q.shape) != want or q.dtype != torch.int8:
                got = f"{str(q.dtype).removeprefix('torch.')} {tuple(q.shape)}"
                raise ArtifactError(
                    file, f"weights do not match config ({name}.weight_int8 is {got}, config says int8 {want})"
                )
            n = want[0] if per_channel else 1
            for key, t in ((keys[1], scale), (keys[2], zp)):
                if tuple(t.shape) != (n,):
                    granularity = "per-channel" if per_channel else "per-tensor"
                    raise ArtifactError(
                        file,
                        f"weights do not match config ({key} is {tuple(t.shape)}, {granularity} int8 needs ({n},))",
                    )
            if not (torch.isfinite(scale).all() and (scale > 0).all()):
                raise ArtifactError(file, f"{keys[1]} holds zero, negative or non-finite scales")
            bias = tensors.pop(f"{name}.bias", None)
            if (bias is None) != (own_bias is None) or (bias is not None and bias.shape != own_bias.shape):
                got = "missing" if bias is None else f"{tuple(bias.shape)}"
                need = "none" if own_bias is None else f"{tuple(own_bias.shape)}"
                raise ArtifactError(file, f"weights do not match config ({name}.bias is {got}, config says {need})")
            if backend == "torch.ao":
                _fill_torch_ao(m, q, scale, zp, bias, per_channel, file, name)
            else:
                _fill_torchao(m, q, scale, zp, bias, file, name)
        own = {
            n: t
            for n, t in [*qmodel.named_parameters(), *qmodel.named_buffers()]
            if n.rsplit(".", 1)[0] not in quantized
        }
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if unexpected or missing:
            raise ArtifactError(
                file, f"weights do not match config (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        for name, t in tensors.items():
            if own[name].shape != t.shape:
                raise ArtifactError(
                    file,
                    f"weights do not match config ({name} is {tuple(t.shape)}, config says {tuple(own[name].shape)})",
                )
            own[name].copy_(t)
    return qmodel.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by Linear weights: float numel x element size, int8 Linears their int8 values plus float32 scales.

    A Linear whose weight is an embedding table (a tied LM head) is not counted.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for m in model.modules():
        if _int8_backend(m) is not None:
            q, scale, _, _ = _int8_tensors(m)
            total += q.numel() * q.element_size() + scale.numel() * scale.element_size()
        elif isinstance(m, nn.Linear) and id(m.weight) not in embeddings:
            total += m.weight.numel() * m.weight.element_size()
    return total


def time_forward(model: nn.Module, batch: tuple[torch.Tensor, ...], reps: int = 10, warmup: int = 3) -> float:
    """Median wall time in ms of `model(*batch)` over `reps` runs, after `warmup` untimed ones."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + reps):
            start = time.perf_counter()
            model(*batch)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def pick_backend(
    model: nn.Module, sample_ids: torch.Tensor, sample_lengths: torch.Tensor, per_channel: bool = True, reps: int = 10
) -> BackendChoice:
    """Quantize `model` with every backend, time a forward on the sample batch, and choose the fastest.

    A backend that fails to import or to run is left out (its one-line error is in `errors`); when torchao fails,
    torch.ao is chosen.

    Raises:
        RuntimeError: when no backend runs at all.
    """
    ms: dict[str, float] = {}
    errors: dict[str, str] = {}
    first_error: Exception | None = None
    for backend in BACKENDS:
        try:
            qmodel = quantize_classifier(model, backend, per_channel)
            ms[backend] = time_forward(qmodel, (sample_ids, sample_lengths), reps)
        except Exception as e:  # an optional backend that cannot run here is a measurement, not a failure
            errors[backend] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            first_error = first_error or e
    if not ms:
        raise RuntimeError(f"no int8 backend runs here ({errors})") from first_error
    return BackendChoice(min(ms, key=ms.get), ms, errors)
