"""int8 quantization of a Transformer classifier with two backends, and its weights as plain tensors.

`torch.ao` is `quantize_dynamic` (fbgemm kernels; deprecated, yet the fastest eager-mode CPU path in torch 2.13);
`torchao` is `quantize_` with `Int8DynamicActivationInt8WeightConfig` (`Int8Tensor` weights, the maintained path,
built for torch.compile and GPUs). Activations are quantized per batch in both, weights are symmetric int8.

Whatever the backend, an int8 Linear's weight reads out as one `Int8Weight` (int8 values, float32 scales, int32
zero points, bias) and is set back from one, through public APIs: so the saved form (models/checkpoint.py, which
writes and reads these tensors) is the same for both backends, and a folder written with one loads with the other.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn

BACKENDS = ("torch.ao", "torchao")
"""int8 backends: torch.ao `quantize_dynamic` and torchao `quantize_`."""
SYMMETRIC_BACKENDS = ("torchao",)
"""Backends whose int8 weights have no zero point (their zero points are all zero)."""

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


def check_backend(backend: str) -> None:
    """Raise a ValueError unless `backend` is one of BACKENDS."""
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


def quantize_linears(model: nn.Module, backend: str, per_channel: bool) -> nn.Module:
    """int8 every nn.Linear of `model` (in place for torchao, a new module for torch.ao)."""
    check_backend(backend)
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


def int8_backend(m: nn.Module) -> str | None:
    """The backend that quantized module `m`, or None when `m` is not an int8 Linear."""
    if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") and hasattr(m, "_packed_params"):
        return "torch.ao"
    if isinstance(m, nn.Linear) and type(m.weight).__module__.startswith("torchao") and hasattr(m.weight, "qdata"):
        return "torchao"
    return None


def int8_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The int8 Linears of `model` by module name (either backend)."""
    return {name: m for name, m in model.named_modules() if int8_backend(m) is not None}


class Int8Weight(NamedTuple):
    """The weight and bias of one int8 Linear as plain tensors, the same for both backends."""

    values: torch.Tensor
    """int8, (out, in)."""
    scale: torch.Tensor
    """float32, (out,) per channel or (1,) per tensor."""
    zero_point: torch.Tensor
    """int32, the shape of `scale`."""
    bias: torch.Tensor | None
    """float, (out,), or None for a Linear without one."""


def int8_weight(m: nn.Module) -> Int8Weight:
    """The int8 weight of int8 Linear `m` (either backend) as plain tensors."""
    if int8_backend(m) == "torch.ao":
        w, b = m.weight(), m.bias()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zp = w.q_per_channel_scales().float(), w.q_per_channel_zero_points().to(torch.int32)
        else:
            scale, zp = (
                torch.tensor([w.q_scale()], dtype=torch.float32),
                torch.tensor([w.q_zero_point()], dtype=torch.int32),
            )
        return Int8Weight(w.int_repr(), scale, zp, b)
    w = m.weight
    zp = w.zero_point if w.zero_point is not None else torch.zeros_like(w.scale)
    return Int8Weight(w.qdata, w.scale.reshape(-1).float(), zp.reshape(-1).to(torch.int32), m.bias)


def set_int8_weight(m: nn.Module, weight: Int8Weight, per_channel: bool) -> None:
    """Give int8 Linear `m` (either backend) the stored `weight` (shapes checked by the caller).

    torch.ao rounds again on the way in: whether `int8_weight(m)` gives back `weight.values` is the caller's check.

    Raises:
        ValueError: a torchao Linear given non-zero zero points (its int8 weights are symmetric).
    """
    q, scale, zp, bias = weight
    if int8_backend(m) == "torch.ao":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            if per_channel:  # dequantize, then quantize again with the same scales: gives back exactly q
                w = torch.quantize_per_channel(
                    (q.float() - zp.float()[:, None]) * scale[:, None], scale.double(), zp.long(), 0, torch.qint8
                )
            else:
                w = torch.quantize_per_tensor((q.float() - zp.float()) * scale, float(scale), int(zp), torch.qint8)
        m.set_weight_bias(w, bias)
        return
    if zp.any():
        raise ValueError("zero points are not all zero; torchao int8 weights are symmetric")
    w = m.weight
    w.qdata.copy_(q)
    w.scale.copy_(scale.reshape(w.scale.shape))
    if w.zero_point is not None:
        w.zero_point.zero_()
    if bias is not None:
        m.bias.copy_(bias)


def quantize_classifier(model: nn.Module, backend: str = "torch.ao", per_channel: bool = True) -> nn.Module:
    """int8 copy of a float classifier: every nn.Linear gets int8 weights, activations are quantized per batch.

    Args:
        model: the float classifier; left untouched.
        backend: "torch.ao" (quantize_dynamic) or "torchao" (quantize_ with Int8DynamicActivationInt8WeightConfig).
        per_channel: one weight scale per output channel; False = one per tensor.
    """
    check_backend(backend)
    model = copy.deepcopy(model).eval()
    if hasattr(model, "trunk"):
        model.trunk.lm_head = nn.Identity()  # tied to the embedding; the classifier never uses it
    return quantize_linears(model, backend, per_channel)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes held by Linear weights: float numel x element size, int8 Linears their int8 values plus float32 scales.

    A Linear whose weight is an embedding table (a tied LM head) is not counted.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    total = 0
    for m in model.modules():
        if int8_backend(m) is not None:
            q, scale, _, _ = int8_weight(m)
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
