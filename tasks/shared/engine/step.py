"""The one training step (`train_step`), the timer of bare steps, and throughput accounting.

Pretraining, every classifier fit (fine-tuning, baselines, recovery, distillation), the pretrain stage's
own benchmark (`step_throughput`) and `bench/train_throughput.py` all step through `train_step`; the
bare-step figure of the stage and of the bench comes from one timer, `time_lm_steps`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn

from tasks.shared.config.training import TrainLoop
from tasks.shared.engine.optim import build_optimizer
from tasks.shared.engine.runtime import Runtime, unwrap
from tasks.shared.errors import UserError

Batch = TypeVar("Batch")

# ---------------------------------------------------------------------------------------------
# the step


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, grad_clip: float) -> float:
    """Unscale (fp16), clip, step, zero the gradients; returns the global gradient norm before clipping."""
    if rt.scaler is not None:
        rt.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if rt.scaler is not None:
        rt.scaler.step(opt)
        rt.scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce unless `sync` (the last micro-batch of a step): DDP's `no_sync`,
    FSDP's `set_requires_gradient_sync`; nothing for a model in one process."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rt: Runtime,
    micro_batches: Sequence[Batch],
    loss_of: Callable[[Batch], torch.Tensor],
    grad_clip: float,
) -> tuple[torch.Tensor, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); the caller sets the lr first.

    Each micro-batch's loss is `loss_of(micro_batch)` (forward and loss, under `rt`'s autocast) divided by
    the number of micro-batches, and its backward is scaled by `rt.scaler` under fp16; gradients are
    all-reduced on the last micro-batch only. Then `clip_and_step`. Returns the step's loss (the mean over its
    micro-batches, still on the device: no sync) and the gradient norm before clipping.
    """
    n = len(micro_batches)
    total = torch.zeros((), device=rt.device)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, i == n - 1):
            with rt.autocast():
                loss = loss_of(batch) / n
            (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
        total += loss.detach()
    return total, clip_and_step(model, opt, rt, grad_clip)


def lm_loss(model: nn.Module, device: torch.device, fused: bool) -> Callable[[tuple], torch.Tensor]:
    """`loss_of` for a language model: a micro-batch (inputs, targets) -> mean loss, moved to `device` on the way."""

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return model(x.to(device, non_blocking=True), y.to(device, non_blocking=True), fused_loss=fused)[1]

    return loss_of


def use_fused_loss(setting: str, device: torch.device) -> bool:
    """Whether the LM loss runs through `models.losses.linear_cross_entropy` (`on` / `off` / `auto`).

    `auto` is on for CPU runs: measured +20% tokens/s at a 50k vocabulary and about +5% at the default 4k
    (docs/benchmarks.md); on GPUs the plain head under autocast is left to cuBLAS.
    """
    return setting == "on" or (setting == "auto" and device.type == "cpu")


def check_finite(
    run: str,
    step: int,
    lr: float,
    rt: Runtime,
    grad_clip: float,
    *,
    loss: float | None = None,
    grad_norm: float | None = None,
    lr_key: str | None = None,
) -> None:
    """Stop a diverged run: UserError when the loss or gradient norm of `step` is nan or inf.

    Pass only values already on the host (the grad norm `train_step` returns, the loss where it is
    logged), so the check adds no device sync. Under fp16 loss scaling an infinite gradient is routine
    (the scaler skips that step), so only the loss counts there. `run` starts with the params.yaml
    section the fixes name (`pretrain`, `finetune cnn`).
    """
    norm = None if rt.scaler is not None else grad_norm
    bad = [(name, v) for name, v in (("loss", loss), ("gradient norm", norm)) if v is not None and not math.isfinite(v)]
    if not bad:
        return
    section = run.split()[0]
    fixes = [f"lower {lr_key or section + '.lr'}"]
    fixes += [] if grad_clip else [f"set {section}.grad_clip"]
    fixes += [f"use {section}.precision: fp32"] if rt.precision != "fp32" else []
    hint = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
    name, value = bad[0]
    raise UserError(f"{run}: {name} is {value} at step {step} (lr {lr:.3g}): {hint}")


# ---------------------------------------------------------------------------------------------
# bare steps, timed


def time_steps(step: Callable[[int], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds that `step(i)` takes for i = warmup .. warmup + steps - 1, after untimed calls for i < warmup.

    On CUDA the clock is read after a synchronize, so queued kernels count where they ran.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    sync()
    return time.perf_counter() - start


def time_lm_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rt: Runtime,
    tokens: torch.Tensor,
    fused: bool,
    grad_clip: float,
    warmup: int,
) -> tuple[float, torch.Tensor]:
    """Bare training steps (`train_step`, one micro-batch each) on token windows `tokens` (N, B, T + 1): the
    seconds of the last N - warmup steps and the last step's loss (on the device)."""
    loss_of = lm_loss(model, rt.device, fused)
    last: list[torch.Tensor] = []

    def one(i: int) -> None:
        batch = (tokens[i, :, :-1], tokens[i, :, 1:])
        last[:] = [train_step(model, opt, rt, [batch], loss_of, grad_clip)[0]]

    seconds = time_steps(one, len(tokens) - warmup, warmup, rt.device)
    return seconds, last[0]


def step_throughput(
    model: nn.Module,
    cfg: TrainLoop,
    rt: Runtime,
    batch: int,
    block: int,
    vocab: int,
    fused: bool,
    steps: int = 10,
    warmup: int = 2,
) -> float:
    """Tokens/s of the bare training step (forward, loss, backward, clipping, optimizer) on random tokens:
    what `bench/train_throughput.py` measures, here for `model` as configured. Runs on a copy with its own
    optimizer (and, under fp16, its own loss scale) and a forked random stream, so the training it is
    compared with is untouched."""
    twin = copy.deepcopy(unwrap(model)).train()
    opt = build_optimizer(twin, cfg, rt.device)
    rt = rt.with_precision(rt.precision)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        tokens = torch.randint(vocab, (steps + warmup, batch, block + 1))
        seconds, _ = time_lm_steps(twin, opt, rt, tokens, fused, cfg.grad_clip, warmup)
    return steps * batch * block / seconds


# ---------------------------------------------------------------------------------------------
# throughput accounting

# Dense peak FLOP/s by (GPU name fragment, precision); first match wins. From the vendors' data sheets.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak dense FLOP/s of one device at `precision`, or None when unknown (CPUs: n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return peaks.get(precision)
    return None


def mfu(
    flops_per_token: float, tokens_per_s: float, device: torch.device, precision: str, world: int = 1
) -> float | None:
    """Model FLOPs utilisation: achieved / peak FLOP/s over all `world` devices; None where peak is unknown."""
    peak = peak_flops(device, precision)
    return None if peak is None else flops_per_token * tokens_per_s / (peak * world)


class Throughput:
    """Tokens per second of training alone, per logging window and overall.

    A step's time runs from the end of the previous step (batch assembly and logging included) to
    its own end. Time inside `paused()` (evaluation, checkpointing) counts for nothing, and a
    window's tokens and seconds always restart together, so a logged rate never divides one
    window's tokens by another's time. The first `warmup` steps (allocator, compile) are not counted.
    On CUDA the clock is read after a synchronize, so queued kernels count where they ran.
    """

    def __init__(self, device: torch.device, warmup: int = 1) -> None:
        self.device, self.warmup = device, warmup
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self._window_tokens, self._window_seconds = 0, 0.0
        self._since = time.perf_counter()

    def step(self, tokens: int) -> None:
        """Count a finished optimizer step of `tokens` tokens."""
        now = time.perf_counter()
        if self.steps >= self.warmup:
            self._window_tokens += tokens
            self._window_seconds += now - self._since
        self.steps += 1
        self._since = now

    def _close(self) -> None:
        """Charge the time since the last step to the window (the device's queued work included)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.steps > self.warmup:
            self._window_seconds += now - self._since
        self._since = now

    @contextlib.contextmanager
    def paused(self):
        """Leave the block's time out of every rate."""
        self._close()
        try:
            yield
        finally:
            self._since = time.perf_counter()

    def window_rate(self) -> float | None:
        """Tokens/s of the window since the last call (None if it counted no step); starts a new window."""
        self._close()
        tokens, seconds = self._window_tokens, self._window_seconds
        self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds
        self._window_tokens, self._window_seconds = 0, 0.0
        return tokens / seconds if tokens and seconds > 0 else None

    def overall_rate(self) -> float | None:
        """Tokens/s over every counted step (closes the current window into the total)."""
        self.window_rate()
        return self.tokens / self.seconds if self.tokens and self.seconds > 0 else None
