"""Where a process trains: device, process group, precision (with the CPU precision probe), model wrapping.

Multi-process runs are started by `torchrun` (`relaunch_under_torchrun`) and every process calls
`setup_runtime`, which joins the process group that torchrun's environment describes. A `Runtime` is a
value: code that wants another precision builds a new one (`Runtime.with_precision`), so no model's
choice changes the runtime another model uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from tasks.shared.config.training import TrainLoop
from tasks.shared.cost import ROOT_ENV
from tasks.shared.errors import UserError

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Autocast dtype per precision name (None: plain fp32)."""


@dataclass(frozen=True)
class Runtime:
    """Where this process trains and how it talks to the others."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None
    """Autocast dtype, None for plain fp32."""
    scaler: Any = None
    """torch.amp.GradScaler for fp16, else None."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def precision(self) -> str:
        return {dtype: name for name, dtype in PRECISIONS.items()}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def with_precision(self, precision: str) -> Runtime:
        """This runtime in `precision` (fp32 / bf16 / fp16), with a loss scaler of its own for fp16."""
        dtype = PRECISIONS[precision]
        return dataclasses.replace(self, amp_dtype=dtype, scaler=_grad_scaler(dtype, self.device))


def _grad_scaler(amp_dtype: torch.dtype | None, device: torch.device):
    return torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None


def _pick_device(want: str, local_rank: int) -> torch.device:
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError("params.yaml: device: cuda requested but no CUDA device is available")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision in PRECISIONS:
        return PRECISIONS[precision]
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # auto on CUDA


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# precision: auto on CPU, timed per model

BF16_MIN_GAIN = 1.1
"""`precision: auto` on CPU trains in bf16 only when the probe finds it at least this much faster than fp32."""


PRECISION_REPLAY_ENV = "LMFORGE_PRECISION_REPLAY"
"""JSON `{model: precision}` that `precision: auto` on CPU takes instead of timing: `lmforge verify` replays what the
run it rebuilds chose (a model is named by its stage, or a baseline by its own name)."""


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (Linux /proc/cpuinfo) of the native bf16 matrix instructions that oneDNN uses."""


def cpu_bf16_supported(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), as the kernel lists its flags.

    Where the kernel does not say (no /proc/cpuinfo: not Linux), bf16 is timed like anywhere else: a CPU that
    emulates it loses the probe.
    """
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return True
    return any(flag in flags for flag in BF16_CPU_FLAGS)


@dataclass
class PrecisionProbe:
    """What `probe_cpu_precision` chose and measured: median seconds of one forward + backward per precision."""

    chosen: str
    """The precision to train in (fp32 / bf16 / fp16): pass it to `Runtime.with_precision`."""
    fp32_s: float | None = None
    bf16_s: float | None = None
    reason: str = ""

    def metrics(self) -> dict:
        return {
            "precision": self.chosen,
            "precision_probe_fp32_ms": _ms(self.fp32_s),
            "precision_probe_bf16_ms": _ms(self.bf16_s),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def _time_precisions(
    rt: Runtime, model: nn.Module, loss: Callable[[], torch.Tensor], reps: int
) -> dict[str, list[float]]:
    """Seconds of `reps` forward + backward passes in fp32 and bf16, interleaved, after one untimed pair."""
    runtimes = {name: rt.with_precision(name) for name in ("fp32", "bf16")}
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    with torch.random.fork_rng(devices=[]):
        for i in range(reps + 1):
            for name, each in runtimes.items():
                t0 = time.perf_counter()
                with each.autocast():
                    out = loss()
                out.float().backward()
                if i:
                    times[name].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return times


def replayed_precision(name: str) -> str | None:
    """The precision PRECISION_REPLAY_ENV names for model `name`, if it names one."""
    raw = os.environ.get(PRECISION_REPLAY_ENV)
    if not raw:
        return None
    try:
        chosen = json.loads(raw).get(name)
    except (ValueError, AttributeError):
        raise UserError(f"{PRECISION_REPLAY_ENV}: not a JSON object of model -> precision: {raw[:200]!r}") from None
    if chosen is not None and chosen not in PRECISIONS:
        raise UserError(f"{PRECISION_REPLAY_ENV}: {name}: {chosen!r} is not one of {sorted(PRECISIONS)}")
    return chosen


def probe_cpu_precision(
    rt: Runtime, precision: str, model: nn.Module, loss: Callable[[], torch.Tensor], name: str, reps: int = 5
) -> PrecisionProbe:
    """Resolve `precision: auto` on CPU by timing the model itself: bf16 autocast where it is faster.

    Whether bf16 pays depends on the CPU and the shape (on the 2-core AVX512-BF16 VM of docs/benchmarks.md:
    1.12x for the 4 x 128 default at batch 16, 2.61x for 6 x 512; a CPU without native bf16 loses), so it is
    measured here, on this machine and this model: `loss()` (a forward on a representative batch) plus its
    backward runs once untimed and `reps` times timed in each precision, interleaved, and bf16 is chosen when
    the median ratio of each fp32 run to the bf16 run right after it is at least BF16_MIN_GAIN (pairs see the
    same load on the machine). Weights, gradients, random state and `rt` are left as they were: the caller
    trains in `rt.with_precision(probe.chosen)`. Explicit precisions and GPUs keep `rt`'s precision. `name` (the
    stage, or a baseline's name) is how the stage's metrics record the choice, and what PRECISION_REPLAY_ENV
    replays.
    """
    if precision != "auto" or rt.device.type != "cpu":
        return PrecisionProbe(rt.precision, reason=f"precision: {precision} on {rt.device.type}")
    if (replayed := replayed_precision(name)) is not None:
        return PrecisionProbe(replayed, reason=f"replayed from {PRECISION_REPLAY_ENV}")
    if not cpu_bf16_supported():
        return PrecisionProbe("fp32", reason="this CPU has no native bf16 instructions")
    times = _time_precisions(rt, model, loss, reps)
    fp32, bf16 = float(np.median(times["fp32"])), float(np.median(times["bf16"]))
    # each fp32 run against the bf16 run right after it: drift on the machine falls on both sides of a ratio
    gain = float(np.median([a / b for a, b in zip(times["fp32"], times["bf16"])]))
    use_bf16 = torch.tensor(int(gain >= BF16_MIN_GAIN))
    if rt.distributed:  # every process trains alike: rank 0's timing decides
        torch.distributed.broadcast(use_bf16, 0)
    return PrecisionProbe(
        "bf16" if use_bf16.item() else "fp32",
        fp32,
        bf16,
        f"fp32 {_ms(fp32)} ms vs bf16 {_ms(bf16)} ms per forward + backward (median ratio {gain:.2f})",
    )


# ---------------------------------------------------------------------------------------------
# processes


def set_deterministic(on: bool) -> None:
    """Deterministic kernels only (and no TF32), or the fast defaults."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=False)
    torch.backends.cudnn.benchmark = not on
    torch.backends.cuda.matmul.allow_tf32 = not on
    torch.backends.cudnn.allow_tf32 = not on


def setup_runtime(cfg: TrainLoop, backend: str = "auto") -> Runtime:
    """Pick the device, join the process group when torchrun started us, set precision and seeds."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(cfg.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        torch.distributed.init_process_group(chosen, device_id=device if device.type == "cuda" else None)
    set_deterministic(cfg.deterministic)
    amp = _amp_dtype(cfg.precision, device)
    if amp is not None and device.type == "cpu" and amp is torch.float16:
        raise UserError("params.yaml: precision: fp16 needs CUDA (use bf16 or fp32 on CPU)")
    torch.manual_seed(cfg.seed + rank)
    return Runtime(
        device=device, rank=rank, world=world, local_rank=local_rank, amp_dtype=amp, scaler=_grad_scaler(amp, device)
    )


def teardown(rt: Runtime) -> None:
    if rt.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_under_torchrun(module: str, dist, argv: list[str] | None = None) -> int:
    """Run `python -m <module>` under torchrun as `dist` (a DistributedConfig) says; returns its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *dist.torchrun_args(),
        "-m",
        module,
        *(sys.argv[1:] if argv is None else argv),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // dist.nproc))),
        ROOT_ENV: str(os.getpid()),  # rank 0 reports the cost of this process's whole tree
    }
    return subprocess.run(cmd, env=env).returncode


def all_reduce_mean(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.distributed:
        x = x.detach().clone()
        torch.distributed.all_reduce(
            x, op=torch.distributed.ReduceOp.AVG if rt.device.type == "cuda" else torch.distributed.ReduceOp.SUM
        )
        if rt.device.type != "cuda":  # gloo has no AVG
            x /= rt.world
    return x


def wrap_model(model: nn.Module, rt: Runtime, strategy: str, compile: bool) -> nn.Module:
    """Move to the device, shard or replicate across processes, optionally compile."""
    model.to(rt.device)
    if rt.distributed and strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (
            MixedPrecisionPolicy(param_dtype=rt.amp_dtype, reduce_dtype=torch.float32)
            if rt.amp_dtype
            else MixedPrecisionPolicy()
        )
        for block in getattr(model, "blocks", []):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
