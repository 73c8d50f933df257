"""Training engine shared by the training stages: devices and processes, optimizers, schedules,
mixed precision, resumable checkpoints and throughput accounting.

Nothing here knows about a particular stage; `tasks/pretrain.py` and `tasks/finetune.py` hold the
loops, and `bench/train_throughput.py` times the same step. Multi-process runs are started by
`torchrun` (`relaunch_under_torchrun`) and every process calls `setup_runtime`, which joins the
process group that torchrun's environment describes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.checkpoint import ArtifactError, load_json, load_tensors, verify_manifest, write_manifest
from tasks.shared.config.training import TrainLoop
from tasks.shared.errors import UserError
from tasks.shared.io import atomic_dir
from tasks.shared.shards import open_shards, shard_files

# ---------------------------------------------------------------------------------------------
# devices and processes


@dataclass
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
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


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
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # auto on CUDA


BF16_MIN_GAIN = 1.1
"""`precision: auto` on CPU trains in bf16 only when the probe finds it at least this much faster than fp32."""


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX) that oneDNN uses."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@dataclass
class PrecisionProbe:
    """What `probe_cpu_precision` measured: median seconds of one forward + backward in each precision."""

    chosen: str
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


def probe_cpu_precision(
    rt: Runtime, precision: str, model: nn.Module, loss: Callable[[], torch.Tensor], reps: int = 5
) -> PrecisionProbe:
    """Resolve `precision: auto` on CPU by timing the model itself: bf16 autocast where it is faster.

    Whether bf16 pays depends on the CPU and the shape (on the 2-core AVX512-BF16 VM of docs/benchmarks.md:
    1.12x for the 4 x 128 default at batch 16, 2.61x for 6 x 512; a CPU without native bf16 loses), so it is
    measured here, on this machine and this model: `loss()` (a forward on a representative batch) plus its backward runs
    once untimed and `reps` times timed in each precision, interleaved, and bf16 is chosen when the median
    ratio of each fp32 run to the bf16 run right after it is at least BF16_MIN_GAIN (pairs see the same
    load on the machine). Weights, gradients and random state are left as they were. Sets
    `rt.amp_dtype` and returns what it measured. Explicit precisions and GPUs are left alone.
    """
    if precision != "auto" or rt.device.type != "cpu":
        return PrecisionProbe(rt.precision, reason=f"precision: {precision} on {rt.device.type}")
    if not cpu_bf16_supported():
        rt.amp_dtype = None
        return PrecisionProbe("fp32", reason="this CPU has no native bf16 instructions")
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):
        for i in range(reps + 1):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                rt.amp_dtype = dtype
                t0 = time.perf_counter()
                with rt.autocast():
                    out = loss()
                out.float().backward()
                if i:
                    times[name].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    fp32, bf16 = float(np.median(times["fp32"])), float(np.median(times["bf16"]))
    # each fp32 run against the bf16 run right after it: drift on the machine falls on both sides of a ratio
    gain = float(np.median([a / b for a, b in zip(times["fp32"], times["bf16"])]))
    use_bf16 = torch.tensor(int(gain >= BF16_MIN_GAIN))
    if rt.distributed:  # every process trains alike: rank 0's timing decides
        torch.distributed.broadcast(use_bf16, 0)
    rt.amp_dtype = torch.bfloat16 if use_bf16.item() else None
    return PrecisionProbe(
        rt.precision,
        fp32,
        bf16,
        f"fp32 {_ms(fp32)} ms vs bf16 {_ms(bf16)} ms per forward + backward (median ratio {gain:.2f})",
    )


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
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    torch.manual_seed(cfg.seed + rank)
    return Runtime(device=device, rank=rank, world=world, local_rank=local_rank, amp_dtype=amp, scaler=scaler)


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


# ---------------------------------------------------------------------------------------------
# optimizers and schedules


def param_groups(
    named: list[tuple[str, nn.Parameter]], weight_decay: float, lr_scale: dict[str, float] | None = None
) -> list[dict]:
    """Weight decay on matrices only; optional per-parameter lr multipliers (layer-wise lr)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        wd = weight_decay if p.dim() >= 2 else 0.0
        scale = (lr_scale or {}).get(name, 1.0)
        groups.setdefault((wd, scale), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in groups.items()]


def build_optimizer(
    model: nn.Module, cfg: TrainLoop, device: torch.device, lr_scale: dict[str, float] | None = None
) -> torch.optim.Optimizer:
    """AdamW (fused kernel on CUDA), SGD with Nesterov momentum, or RMSprop."""
    groups = param_groups(list(model.named_parameters()), cfg.weight_decay, lr_scale)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, alpha=0.99, eps=1e-8)


def lr_at(step: int, total: int, cfg: TrainLoop) -> float:
    """Linear warmup to `lr`, then cosine / linear decay to `min_lr` at `total`, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, grad_clip: float) -> float:
    """Unscale (fp16), clip, step; returns the global gradient norm before clipping."""
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
    optimizer and a forked random stream, so the training it is compared with is untouched."""
    import copy

    twin = copy.deepcopy(unwrap(model)).train()
    opt = build_optimizer(twin, cfg, rt.device)
    rt = dataclasses.replace(
        rt, scaler=None if rt.scaler is None else torch.amp.GradScaler(rt.device.type)
    )  # fp16: its own loss scale
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        data = torch.randint(vocab, (steps + warmup, batch, block + 1))
        for i in range(steps + warmup):
            if i == warmup:
                sync()
                start = time.perf_counter()
            x, y = data[i, :, :-1].to(rt.device, non_blocking=True), data[i, :, 1:].to(rt.device, non_blocking=True)
            with rt.autocast():
                _, loss = twin(x, y, fused_loss=fused)
            (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
            clip_and_step(twin, opt, rt, cfg.grad_clip)
        sync()
    return steps * batch * block / (time.perf_counter() - start)


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

    Pass only values already on the host (the grad norm `clip_and_step` returns, the loss where it is
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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def use_fused_loss(setting: str, device: torch.device) -> bool:
    """Whether the LM loss runs through `models.losses.linear_cross_entropy` (`on` / `off` / `auto`).

    `auto` is on for CPU runs: measured +20% tokens/s at a 50k vocabulary and about +5% at the default 4k
    (docs/benchmarks.md); on GPUs the plain head under autocast is left to cuBLAS.
    """
    return setting == "on" or (setting == "auto" and device.type == "cpu")


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


# ---------------------------------------------------------------------------------------------
# data


class TokenShards:
    """Memory-mapped token-id shards (`<split>-*.bin` or `<split>.bin`) sampled as random windows.

    All ranks draw the same global batch from the same generator and each takes its rows, so a
    run's data order does not depend on the number of processes.
    """

    def __init__(self, folder: Path, split: str) -> None:
        self.shards = open_shards(folder, split)
        self.files = shard_files(folder, split)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def windows(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """`n` random windows of `length` consecutive ids (n, length) as int64, one gather per shard."""
        room = np.array([max(0, len(s) - length) for s in self.shards])
        if room.sum() <= 0:
            raise UserError(f"{self.files[0].parent}: shards hold fewer than {length + 1} tokens")
        flat = torch.randint(int(room.sum()), (n,), generator=gen).numpy()
        shard = np.searchsorted(np.cumsum(room), flat, side="right")
        start = flat - np.concatenate([[0], np.cumsum(room)[:-1]])[shard]
        out = np.empty((n, length), dtype=np.int64)
        offsets = np.arange(length)
        for i in np.unique(shard):
            rows = shard == i
            out[rows] = self.shards[i][start[rows, None] + offsets]
        return torch.from_numpy(out)


def causal_batch(data: TokenShards, n: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, T) and next-token targets (n, T)."""
    w = data.windows(n, block + 1, gen)
    return w[:, :-1], w[:, 1:]


def mlm_batch(
    data: TokenShards,
    n: int,
    block: int,
    gen: torch.Generator,
    mask_id: int,
    vocab: int,
    prob: float,
    special: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: `prob` of the tokens become targets; of those 80% -> mask, 10% -> random, 10% kept."""
    x = data.windows(n, block, gen)
    chosen = torch.rand(x.shape, generator=gen) < prob
    for sid in special:
        chosen &= x != sid
    y = torch.where(chosen, x, torch.full_like(x, -1))
    r = torch.rand(x.shape, generator=gen)
    x = torch.where(chosen & (r < 0.8), torch.full_like(x, mask_id), x)
    random_ids = torch.randint(vocab, x.shape, generator=gen)
    x = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, x)
    return x, y


# ---------------------------------------------------------------------------------------------
# resumable checkpoints

STEP_DIR = re.compile(r"^step-(\d{8})$")
CKPT_WEIGHTS, CKPT_TENSORS, CKPT_STATE = "model.safetensors", "train_state.safetensors", "train_state.json"


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (config, data description): a checkpoint resumes only its own run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where it stopped."""

    step: int
    fingerprint: str
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _full_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(unwrap(model), opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pname, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{pname}/{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pname}/{k}"] = v
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, t in tensors.items():
        if key.startswith("state/"):
            _, rest = key.split("/", 1)
            pname, k = rest.rsplit("/", 1)
            state.setdefault(pname, {})[k] = t
    for key, v in meta["scalars"].items():
        pname, k = key.rsplit("/", 1)
        state.setdefault(pname, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: Path,
    state: TrainState,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    rt: Runtime,
    gen: torch.Generator,
    keep: int = 2,
) -> Path | None:
    """Write `folder/step-XXXXXXXX/` atomically (model, optimizer, RNG, scaler, state, manifest); keep
    the newest `keep`.

    Collective under FSDP (every rank must call it); only rank 0 writes.
    """
    from safetensors.torch import save_file

    msd, osd = _full_state(model, opt)
    if not rt.is_main:
        return None
    seen: dict[int, str] = {}
    weights = {}
    for k, v in msd.items():  # tied weights: store each storage once
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        weights[k] = v.detach().cpu().contiguous()
    tensors, opt_meta = _flatten_optimizer(osd)
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/data"] = gen.get_state()
    if rt.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(rt.device)
    meta = {
        "step": state.step,
        "fingerprint": state.fingerprint,
        "history": state.history,
        "extra": state.extra,
        "optimizer": opt_meta,
        "scaler": rt.scaler.state_dict() if rt.scaler is not None else None,
        "world": rt.world,
    }

    target = Path(folder) / f"step-{state.step:08d}"
    with atomic_dir(target) as d:
        save_file(weights, str(d / CKPT_WEIGHTS))
        save_file(tensors, str(d / CKPT_TENSORS))
        (d / CKPT_STATE).write_text(json.dumps(meta))
        write_manifest(d)  # resume checks every file against it
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clear_checkpoints(folder: Path, rt: Runtime) -> int:
    """Remove every checkpoint in `folder` (a run starting afresh); returns how many. Collective: every
    rank has finished looking for one to resume before rank 0 deletes."""
    if rt.distributed:
        torch.distributed.barrier()
    found = checkpoints(folder)
    if rt.is_main:
        for old in found:
            shutil.rmtree(old, ignore_errors=True)
    return len(found)


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest first (a half-written one is never named step-*)."""
    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and STEP_DIR.match(p.name))


@dataclass
class Checkpoint:
    """A checkpoint read from disk and verified, not yet applied to a model."""

    path: Path
    meta: dict
    weights: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.meta["step"]


def read_checkpoint(path: Path) -> Checkpoint:
    """Check a checkpoint folder against its manifest (older ones have none) and read it into memory.

    Raises:
        ArtifactError: naming the file that is missing, truncated, corrupt or incomplete.
    """
    path = Path(path)
    verify_manifest(path)
    meta = load_json(path / CKPT_STATE, ("step", "fingerprint", "history", "optimizer"))
    if not isinstance(meta["step"], int) or not {"param_groups", "scalars"} <= set(meta["optimizer"] or {}):
        raise ArtifactError(path / CKPT_STATE, "step or optimizer entry is malformed")
    weights, tensors = load_tensors(path / CKPT_WEIGHTS), load_tensors(path / CKPT_TENSORS)
    if "rng/data" not in tensors:
        raise ArtifactError(path / CKPT_TENSORS, "no data RNG state")
    return Checkpoint(path, meta, weights, tensors)


def latest_checkpoint(folder: Path, fp: str) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint of run `fp` in `folder` that reads back intact, and the newer ones that did
    not, each with what is wrong (`model.safetensors: corrupt (sha256 mismatch)`)."""
    unusable = []
    for p in reversed(checkpoints(folder)):
        try:
            if load_json(p / CKPT_STATE).get("fingerprint") != fp:
                continue  # another run's checkpoint
            return read_checkpoint(p), unusable
        except ArtifactError as e:
            unusable.append((p, f"{e.file.relative_to(p) if e.file.is_relative_to(p) else e.file}: {e.problem}"))
    return None, unusable


def restore_checkpoint(
    ck: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, gen: torch.Generator
) -> TrainState:
    """Restore model, optimizer, scaler and RNG state in place from a read checkpoint; returns its TrainState."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    meta, weights, tensors = ck.meta, dict(ck.weights), ck.tensors
    inner = unwrap(model)
    named = inner.state_dict(keep_vars=True)
    for name, p in named.items():  # tied weights were stored once
        if name not in weights:
            for o, q in named.items():
                if o in weights and q is p:
                    weights[name] = weights[o]
    set_state_dict(
        inner,
        opt,
        model_state_dict=weights,
        optim_state_dict=_unflatten_optimizer(tensors, meta["optimizer"]),
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
    )
    if meta.get("scaler") and rt.scaler is not None:
        rt.scaler.load_state_dict(meta["scaler"])
    gen.set_state(tensors["rng/data"])
    if rt.is_main and meta.get("world", 1) == rt.world:
        torch.set_rng_state(tensors["rng/torch"])
        if rt.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], rt.device)
    else:  # other ranks: a fresh stream that still depends only on (seed, rank, step)
        torch.manual_seed(hash((meta["step"], rt.rank)) & 0xFFFFFFFF)
    return TrainState(
        step=meta["step"], fingerprint=meta["fingerprint"], history=meta["history"], extra=meta.get("extra", {})
    )


def load_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, rt: Runtime, gen: torch.Generator
) -> TrainState:
    """Read, verify and restore the checkpoint at `path` (see `read_checkpoint`, `restore_checkpoint`)."""
    return restore_checkpoint(read_checkpoint(path), model, opt, rt, gen)
