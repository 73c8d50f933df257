"""Sparse attention: forward + backward time and peak memory of one attention layer and one block, dense vs sparse.

    python bench/attention.py                                  # or: lmforge bench attention
    python bench/attention.py --lengths 512,1024 --repeat 3
    python bench/attention.py --preset tiny --lengths 64,128 --window 16   # seconds (the unit test's run)
    python bench/attention.py --chunked                        # fixed chunks (finetune's default) instead
    python bench/attention.py --device cuda                    # on a GPU

Measured, at each length of `--lengths` (batch 1, the width and heads of `--preset`; default `small`: 128 wide,
4 heads), for (a) one attention layer (models/transformer.py `SelfAttention`) and (b) one whole `Block`:
- sparse: the trunk's own path for a windowed model, `attention_pattern` -> `SparsePattern` -> the blocked kernel
  of models/attention.py (`--window` 128, the pretraining context, and `--global-tokens` 1, the first token;
  `--chunked`: fixed chunks of the window, each block of queries over its own key block only);
- dense: the same sliding-window + global pattern as a dense (T, T) mask through SDPA (`dense_mask`: what the
  engine did before the blocked kernel);
- full: plain causal attention, SDPA `is_causal=True` with no mask (what a model without a window costs), the
  reference column.
One step is what `GPT.forward` does for one layer: build the attention pattern from the config (for dense, the
(T, T) mask), the forward, and the backward of a fixed random output gradient into the input and the weights.
`pattern_ms` reports the pattern's share alone (a model of n layers builds it once per forward, not n times).
Time: the median of `--repeat` steps after `--warmup` steps. Default causal; `--bidirectional` for encoders.
On CPU the default is 1 thread (`--threads`) timed by the process's CPU time (`--clock cpu`, time.process_time):
on a shared machine a step's wall time counts whatever else runs (with 2 threads on 2 busy cores one descheduled
thread stalls the other at every barrier: wall-time medians came out 2-70x the one-thread CPU times), its CPU
time does not, and a one-thread step's CPU time is its wall time on an idle core. `--clock wall` (the default
with more threads, and on CUDA) times the wall clock.

Peak memory, CPU: the peak resident set of the process during one step above its resident set just before it
(MB = 2**20 bytes), each (length, kind, layer|block) in a fresh process. torch keeps no statistics for CPU tensors,
and the process's peak RSS also counts what the allocator and the kernels take besides tensors. Why this order:
the freed buffers of an earlier step at the same length may stay resident in the allocator (glibc) and would be
reused without raising the peak, so the measured step is the first at its length: the child builds the module and
inputs, warms the libraries up with one step at a short length (2 windows + 1: lazy initialisation, tiny buffers),
resets the kernel's peak counter (Linux: "5" into /proc/self/clear_refs resets VmHWM; `ru_maxrss` cannot be reset
and in a spawned child starts at its parent's size), reads VmRSS, runs the step, reads VmHWM; then it warms up and
times at that length. CUDA (`--device cuda`): `torch.cuda.max_memory_allocated` above `memory_allocated` after
`reset_peak_memory_stats`, and `torch.cuda.synchronize` around each timed step.

Prints a table for the layer and one for the block, and as its last line a JSON object: `lengths`, `dense_ms`,
`sparse_ms`, `full_ms`, `dense_mb`, `sparse_mb`, `full_mb`, `pattern_ms` (the attention layer's, each a mapping
by length as a string), `block` (the same keys for the whole block, with its own ratios), `speedup_at_max` (dense /
sparse time at the longest length), `memory_ratio_at_max` (dense / sparse peak memory there), `sparse_growth`
(sparse time at the longest length / at 1,024, or at the shortest length when 1,024 is not measured; `growth_from`
says which), `targets_met` (issue 27's targets at the longest length, on the attention layer: >= 4x faster, >= 4x
less peak memory, growth <= 10x), `settings`, `machine` (CPU or GPU, threads, torch, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.attention import SparsePattern, dense_mask  # noqa: E402
from models.transformer import PRESETS, Block, GPTConfig, SelfAttention, attention_pattern  # noqa: E402

KINDS = ("dense", "sparse", "full")
PARTS = ("layer", "block")
GROWTH_FROM = 1024
"""`sparse_growth` is the sparse time at the longest length over the time at this length (issue 27)."""
TARGET_SPEEDUP, TARGET_MEMORY, TARGET_GROWTH = 4.0, 4.0, 10.0
MB = 2**20


@dataclass(frozen=True)
class Cell:
    """One measurement: a length, a kind of attention, a layer or a block, and the settings."""

    length: int
    kind: str
    part: str
    preset: str = "small"
    window: int = 128
    global_tokens: int = 1
    causal: bool = True
    chunked: bool = False
    """Fixed chunks of `window` instead of a sliding window (`GPTConfig.attn_chunked`, finetune's default)."""
    device: str = "cpu"
    warmup: int = 2
    repeat: int = 5
    threads: int = 1
    clock: str = "cpu"
    """`cpu`: the process's CPU time (time.process_time); `wall`: wall time (time.perf_counter)."""


def model_config(cell: Cell, length: int) -> GPTConfig:
    """The preset's shape read at `length`, with the cell's window and global tokens (none for `full`)."""
    windowed = cell.kind != "full"
    return PRESETS[cell.preset](
        block_size=length,
        attn_window=cell.window if windowed else 0,
        attn_global=cell.global_tokens if windowed else 0,
        attn_chunked=cell.chunked and windowed,
        causal=cell.causal,
    )


def pattern(cell: Cell, cfg: GPTConfig, length: int):
    """The attention pattern of `length` tokens: the trunk's own for sparse and full, the dense mask for dense."""
    if cell.kind != "dense":
        return attention_pattern(cfg, length, None, cell.device)
    glob = (torch.arange(length, device=cell.device) < cfg.attn_global)[None] if cfg.attn_global else None
    return dense_mask(length, cfg.causal, cfg.attn_window, glob, None, cell.device, chunked=cfg.attn_chunked)


def step_fn(cell: Cell, length: int):
    """A function doing one step (pattern, forward, backward) at `length`, its module and input built once."""
    torch.manual_seed(0)
    cfg = model_config(cell, length)
    module = (Block(cfg) if cell.part == "block" else SelfAttention(cfg)).to(cell.device)
    x = torch.randn(1, length, cfg.n_embd, device=cell.device, requires_grad=True)  # (B, T, C)
    grad = torch.randn(1, length, cfg.n_embd, device=cell.device)
    if cell.kind == "sparse" and not isinstance(pattern(cell, cfg, length), SparsePattern):
        raise SystemExit(
            f"attention: length {length} is not over 2 windows ({cell.window}): the trunk would not use "
            "the blocked kernel"
        )

    def step() -> None:
        mask = pattern(cell, cfg, length)
        y = module(x, mask) if cell.part == "block" else module(x, mask, None)  # (B, T, C)
        y.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    return step, (lambda: pattern(cell, cfg, length))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def proc_status_kb(field: str) -> int:
    """A `field:` of /proc/self/status (VmRSS, VmHWM), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_mb(step, device: str) -> float:
    """Peak memory of one call of `step` above the memory in use just before it, in MB (module docstring)."""
    if device.startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        sync(device)
        return (torch.cuda.max_memory_allocated() - before) / MB
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_kb("VmRSS")
    step()
    return (proc_status_kb("VmHWM") - before) * 1024 / MB


def median_ms(fn, cell: Cell, warmup: int) -> float:
    """Median time of `fn()` in milliseconds on the cell's clock over `cell.repeat` calls after `warmup` calls."""
    clock = time.process_time if cell.clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(cell.repeat):
        sync(cell.device)
        t = clock()
        fn()
        sync(cell.device)
        times.append(clock() - t)
    return 1000 * statistics.median(times)


def measure_cell(cell: Cell) -> dict:
    """In this (fresh) process: the cell's peak memory (first step at its length), then its median step time."""
    torch.set_num_threads(cell.threads)
    short = 2 * cell.window + 1  # the shortest length that takes the blocked kernel
    warm, _ = step_fn(cell, short)
    warm()  # lazy library initialisation, with buffers too small to hide the measured step's
    del warm
    step, build_pattern = step_fn(cell, cell.length)
    mb = peak_mb(step, cell.device)
    ms = median_ms(step, cell, cell.warmup)
    return {"ms": ms, "mb": mb, "pattern_ms": median_ms(build_pattern, cell, 1)}


def in_fresh_process(fn, *args) -> dict:
    """`fn(*args)` in a new process, so that its memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def by_length(results: dict, part: str, kind: str, key: str, lengths: list[int], digits: int) -> dict:
    return {str(n): round(results[(n, kind, part)][key], digits) for n in lengths}


def summary(results: dict, part: str, lengths: list[int]) -> dict:
    """The JSON keys of one part (layer or block): times, memory, ratios and targets at the longest length."""
    r = {f"{k}_ms": by_length(results, part, k, "ms", lengths, 2) for k in KINDS}
    r |= {f"{k}_mb": by_length(results, part, k, "mb", lengths, 1) for k in KINDS}
    r["pattern_ms"] = {k: by_length(results, part, k, "pattern_ms", lengths, 3) for k in ("dense", "sparse")}
    top, base = str(lengths[-1]), str(GROWTH_FROM if GROWTH_FROM in lengths else lengths[0])
    speedup = r["dense_ms"][top] / r["sparse_ms"][top]
    memory = r["dense_mb"][top] / max(r["sparse_mb"][top], 0.1)
    growth = r["sparse_ms"][top] / r["sparse_ms"][base]
    r |= {
        "speedup_at_max": round(speedup, 2),
        "memory_ratio_at_max": round(memory, 2),
        "sparse_growth": round(growth, 2),
        "growth_from": int(base),
        "targets_met": {
            "speedup": speedup >= TARGET_SPEEDUP,
            "memory": memory >= TARGET_MEMORY,
            "growth": growth <= TARGET_GROWTH,
        },
    }
    return r


def machine(device: str, load_before: tuple) -> dict:
    """Where the numbers come from: the CPU or GPU, torch's threads and version, the load average around the run."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def table(title: str, r: dict, lengths: list[int]) -> list[str]:
    head = f"{'T':>6} {'dense ms':>10} {'sparse ms':>10} {'full ms':>10} {'speedup':>8} "
    head += f"{'dense MB':>9} {'sparse MB':>10} {'full MB':>9} {'memory':>7}"
    lines = [title, head, "-" * len(head)]
    for n in map(str, lengths):
        ms, mb = [r[f"{k}_ms"][n] for k in KINDS], [r[f"{k}_mb"][n] for k in KINDS]
        lines.append(
            f"{n:>6} {ms[0]:>10,.1f} {ms[1]:>10,.1f} {ms[2]:>10,.1f} {ms[0] / ms[1]:>7.1f}x "
            f"{mb[0]:>9,.1f} {mb[1]:>10,.1f} {mb[2]:>9,.1f} {mb[0] / max(mb[1], 0.1):>6.1f}x"
        )
    lines.append(
        f"at {lengths[-1]}: {r['speedup_at_max']}x faster, {r['memory_ratio_at_max']}x less memory; sparse time "
        f"{r['growth_from']} -> {lengths[-1]}: {r['sparse_growth']}x; targets met: {r['targets_met']}"
    )
    return lines


def run(base: Cell, lengths: list[int], log=None) -> dict:
    """Every (length, kind, part) cell, each in a fresh process; the JSON object of the module docstring."""
    load_before = os.getloadavg()
    results = {}
    for n in lengths:
        for part in PARTS:
            for kind in KINDS:
                results[(n, kind, part)] = in_fresh_process(measure_cell, replace(base, length=n, kind=kind, part=part))
                if log:
                    m = results[(n, kind, part)]
                    log(f"{time.strftime('%H:%M:%S')} {n:>6} {part:<5} {kind:<6} {m['ms']:10.2f} ms {m['mb']:9.1f} MB")
    layer, block = summary(results, "layer", lengths), summary(results, "block", lengths)
    settings = {k: v for k, v in asdict(base).items() if k not in ("length", "kind", "part")}
    shape = PRESETS[base.preset]()
    settings |= {"batch": 1, "n_embd": shape.n_embd, "n_head": shape.n_head, "memory": memory_method(base.device)}
    return {
        "lengths": lengths,
        **layer,
        "block": block,
        "settings": settings,
        "machine": machine(base.device, load_before),
    }


def memory_method(device: str) -> str:
    if device.startswith("cuda"):
        return "torch.cuda.max_memory_allocated above memory_allocated, first step at the length"
    return "peak RSS (VmHWM reset by /proc/self/clear_refs) above VmRSS, fresh process, first step at the length"


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lengths: comma-separated integers, got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise argparse.ArgumentTypeError(f"--lengths: positive integers, got {text!r}")
    return lengths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=parse_lengths, default=[512, 1024, 2048, 4096, 8192])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small", help="width and heads (models/transformer)")
    ap.add_argument("--window", type=int, default=128, help="sliding window (the pretraining context)")
    ap.add_argument("--global-tokens", type=int, default=1, help="global positions: the first n tokens")
    ap.add_argument("--bidirectional", action="store_true", help="encoder attention (default: causal)")
    ap.add_argument("--chunked", action="store_true", help="fixed chunks of --window (default: a sliding window)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the length before the timed ones")
    ap.add_argument("--repeat", type=int, default=5, help="timed steps; the median is reported")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument(
        "--clock", choices=["cpu", "wall"], default=None, help="default: cpu on CPU with 1 thread, else wall"
    )
    args = ap.parse_args(argv)
    if min(args.window, args.repeat, args.threads) < 1 or min(args.global_tokens, args.warmup) < 0:
        ap.error("--window, --repeat and --threads must be >= 1, --global-tokens and --warmup >= 0")
    if args.lengths[0] <= 2 * args.window:
        ap.error(f"--lengths: every length must exceed 2 windows ({2 * args.window}) to take the blocked kernel")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    if not args.device.startswith("cuda") and not Path("/proc/self/clear_refs").exists():
        ap.error("CPU peak memory needs Linux's /proc/self/clear_refs (or use --device cuda)")
    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" and args.threads == 1 else "wall")
    base = Cell(
        0, "", "", args.preset, args.window, args.global_tokens, not args.bidirectional, args.chunked, args.device
    )
    base = replace(base, warmup=args.warmup, repeat=args.repeat, threads=args.threads, clock=clock)
    r = run(base, args.lengths, log=lambda line: print(line, file=sys.stderr, flush=True))
    s, m = r["settings"], r["machine"]
    print(
        f"preset {s['preset']} ({s['n_embd']} wide, {s['n_head']} heads), batch 1, window {s['window']}, "
        f"{s['global_tokens']} global, {'causal' if s['causal'] else 'bidirectional'}; forward + backward, median of "
        f"{s['repeat']} ({s['clock']} time); {m['cpu']}, {m['threads']} threads, torch {m['torch']}"
    )
    print("\n".join(table("one attention layer (SelfAttention)", r, r["lengths"])))
    print("\n".join(table("one block (Block: attention + MLP)", r["block"], r["lengths"])))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
