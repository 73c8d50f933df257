"""Training throughput of the lmforge engine on synthetic tokens (warm-up steps excluded).

Each step is the engine's one training step (`tasks/shared/engine/step.py: train_step`: autocast, loss,
GradScaler-scaled backward under fp16, clipping, optimizer), timed by the same timer as the pretrain
stage's own benchmark (`time_lm_steps`).

    python bench/train_throughput.py --preset nanogpt-cpu
    python bench/train_throughput.py --preset gpt2-124m --compile          # on a GPU
    python bench/train_throughput.py --preset nanogpt-cpu --compare-nanogpt /path/to/nanoGPT --repeat 3

Prints a table and, as its last line, a JSON object with tokens_per_s, mfu, ms_per_iter, device.
The presets copy nanoGPT's benchmark settings so the numbers compare with nanoGPT's `bench.py`
on the same machine.

`--compare-nanogpt PATH` runs nanoGPT's own `bench.py` from a local checkout of karpathy/nanoGPT in the
same command, unmodified, in a subprocess, with the preset's shape (see `SHIM` for how the shape gets in),
and adds nanogpt_tokens_per_s, nanogpt_ms_per_iter and ratio_vs_nanogpt (lmforge / nanoGPT) to the JSON.
nanoGPT's bench.py times 20 steps after 10 burn-in steps (fixed in its code); with --compare-nanogpt ours
defaults to the same 10 + 20. `--repeat N` alternates the two N times (ours, nanoGPT, ours, ...) and
reports medians, so drift on the machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.transformer import GPT, GPTConfig  # noqa: E402
from tasks.shared.config.pretrain import PretrainConfig  # noqa: E402
from tasks.shared.engine.optim import build_optimizer  # noqa: E402
from tasks.shared.engine.runtime import device_name, setup_runtime, wrap_model  # noqa: E402
from tasks.shared.engine.step import mfu, time_lm_steps, use_fused_loss  # noqa: E402

PRESETS = {
    # nanoGPT bench.py shrunk for a CPU: 4 x 128, block 64, batch 12, GPT-2 vocabulary, fp32, no compile.
    "nanogpt-cpu": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=50304),
        batch=12,
        device="cpu",
        precision="fp32",
    ),
    # The pipeline's CPU default (params.yaml: preset small, 4096-token BPE vocabulary, batch 16).
    "cpu-default": dict(
        model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096),
        batch=16,
        device="cpu",
        precision="fp32",
    ),
    # GPT-2 small as in nanoGPT bench.py: batch 16 x 1024 tokens, bf16 autocast.
    "gpt2-124m": dict(
        model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
        batch=16,
        device="cuda",
        precision="bf16",
    ),
}


def measure(preset: str, compile: bool, steps: int, warmup: int, fused_loss: str, threads: int | None) -> dict:
    p = PRESETS[preset]
    if threads:
        torch.set_num_threads(threads)
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset} needs a CUDA GPU")
    cfg = PretrainConfig(
        device=p["device"], precision=p["precision"], compile=compile, lr=6e-4, min_lr=6e-5, fused_loss=fused_loss
    )
    rt = setup_runtime(cfg)
    torch.manual_seed(0)
    model_cfg = GPTConfig(**p["model"])
    model = GPT(model_cfg)
    flops_per_token = model.flops_per_token()
    n_params = model.num_params()
    model = wrap_model(model, rt, "ddp", compile)
    opt = build_optimizer(model, cfg, rt.device)
    fused = use_fused_loss(fused_loss, rt.device)
    B, T = p["batch"], model_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(model_cfg.vocab_size, (steps + warmup, B, T + 1), generator=gen)
    seconds, loss = time_lm_steps(model, opt, rt, data, fused, cfg.grad_clip, warmup)
    final_loss = float(loss)
    tokens_per_s = steps * B * T / seconds
    m = mfu(flops_per_token, tokens_per_s, rt.device, rt.precision)
    return {
        "preset": preset,
        "device": device_name(rt.device),
        "precision": rt.precision,
        "compile": compile,
        "fused_loss": fused,
        "params": n_params,
        "batch": B,
        "block": T,
        "steps": steps,
        "ms_per_iter": round(1000 * seconds / steps, 2),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": None if m is None else round(m, 4),
        "final_loss": round(final_loss, 4),
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# nanoGPT's own bench.py, same shape, same machine (--compare-nanogpt)

NANOGPT_FILES = ("bench.py", "model.py", "configurator.py")
NANOGPT_WARMUP, NANOGPT_STEPS = 10, 20  # bench.py: `for stage, num_steps in enumerate([10, 20])`, only stage 1 is timed
NANOGPT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
NANOGPT_TIMEOUT_S = 3600
NANOGPT_TIME = re.compile(
    r"time per iteration:\s*([0-9.]+(?:[eE][-+]?\d+)?)\s*ms(?:,\s*MFU:\s*(-?[0-9.]+(?:[eE][-+]?\d+)?)\s*%)?"
)
SHIM_TAG = "lmforge-shim: GPTConfig "

SHIM = '''"""lmforge's shim for nanoGPT's bench.py: bench/train_throughput.py --compare-nanogpt writes it as
sitecustomize.py into a temporary folder first on PYTHONPATH. Inert unless LMFORGE_NANOGPT_MODEL is set;
it removes its variables from the environment, so processes bench.py starts (compile workers) are untouched.

bench.py hard-codes GPT-2 small's shape in GPTConfig(...), draws its synthetic tokens below 50304 and calls
torch.cuda.synchronize() even on CPU. Before bench.py runs, this:
  1. loads the checkout's model.py (LMFORGE_NANOGPT_MODEL) as module `model`, so `from model import GPTConfig, GPT`
     gets it, with GPTConfig(...) taking n_layer / n_head / n_embd / vocab_size from LMFORGE_NANOGPT_SHAPE (JSON)
     over bench.py's literals, and prints the config it built (one line, checked by the caller);
  2. when vocab_size is not 50304, draws bench.py's synthetic tokens below vocab_size (torch.randint(50304, size)
     -> torch.randint(vocab_size, size)); the embedding lookup would index out of range otherwise;
  3. sets torch's intra-op threads to LMFORGE_NANOGPT_THREADS (the caller sets OMP_NUM_THREADS too);
  4. on CPU (LMFORGE_NANOGPT_CUDA_SYNC=0) makes torch.cuda.synchronize a no-op.
nanoGPT's model, optimizer and training step are its own, unchanged.
"""
import os

_model_py = os.environ.pop("LMFORGE_NANOGPT_MODEL", None)
if _model_py:
    import importlib.util
    import json
    import sys

    import torch

    _shape = json.loads(os.environ.pop("LMFORGE_NANOGPT_SHAPE"))
    _threads = os.environ.pop("LMFORGE_NANOGPT_THREADS", "")
    if _threads:
        torch.set_num_threads(int(_threads))
    if os.environ.pop("LMFORGE_NANOGPT_CUDA_SYNC", "1") == "0":
        torch.cuda.synchronize = lambda device=None: None
    _spec = importlib.util.spec_from_file_location("model", _model_py)
    _model = importlib.util.module_from_spec(_spec)
    sys.modules["model"] = _model
    _spec.loader.exec_module(_model)
    _GPTConfig = _model.GPTConfig

    def GPTConfig(*args, **kw):
        config = _GPTConfig(*args, **{**kw, **_shape})
        print("lmforge-shim: GPTConfig " + json.dumps(vars(config), default=str), flush=True)
        return config

    _model.GPTConfig = GPTConfig
    if _shape["vocab_size"] != 50304:
        _randint = torch.randint

        def _bench_randint(*args, **kw):
            if len(args) == 2 and args[0] == 50304:
                args = (_shape["vocab_size"], args[1])
            return _randint(*args, **kw)

        torch.randint = _bench_randint
'''


class NanoGPTError(RuntimeError):
    """--compare-nanogpt could not produce a figure; the message is one line."""


def nanogpt_checkout(path: str | Path) -> Path:
    """The checkout folder, or NanoGPTError when it is missing or lacks bench.py / model.py / configurator.py."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise NanoGPTError(f"--compare-nanogpt {path}: no such folder (give a local checkout of karpathy/nanoGPT)")
    if not folder.is_dir():
        raise NanoGPTError(f"--compare-nanogpt {path}: not a folder (give a local checkout of karpathy/nanoGPT)")
    missing = [f for f in NANOGPT_FILES if not (folder / f).is_file()]
    if missing:
        raise NanoGPTError(f"--compare-nanogpt {path}: not a nanoGPT checkout, missing {', '.join(missing)}")
    return folder.resolve()


def nanogpt_command(
    path: Path, preset: str, compile: bool, threads: int | None, python: str = sys.executable
) -> tuple[list[str], dict[str, str]]:
    """nanoGPT's bench.py command line (to run with cwd = `path`) and the environment variables `SHIM` reads,
    for `preset`.

    bench.py takes batch_size / block_size / bias / real_data / device / dtype / compile / profile as `--key=value`;
    the shape (n_layer, n_head, n_embd, vocab_size) goes through LMFORGE_NANOGPT_SHAPE. bias=False and dropout 0
    (bench.py's own) match our GPT; dtype is what bench.py autocasts to on CUDA (on CPU it runs fp32 whatever
    dtype says).
    """
    p, m = PRESETS[preset], PRESETS[preset]["model"]
    argv = [
        python,
        "bench.py",
        f"--batch_size={p['batch']}",
        f"--block_size={m['block_size']}",
        "--bias=False",
        "--real_data=False",
        f"--device={p['device']}",
        f"--dtype={NANOGPT_DTYPES[p['precision']]}",
        f"--compile={bool(compile)}",
        "--profile=False",
    ]
    env = {
        "LMFORGE_NANOGPT_MODEL": str(Path(path) / "model.py"),
        "LMFORGE_NANOGPT_SHAPE": json.dumps({k: m[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size")}),
        "LMFORGE_NANOGPT_CUDA_SYNC": "1" if p["device"] == "cuda" else "0",
    }
    if threads:
        env |= {"LMFORGE_NANOGPT_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    return argv, env


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_nanogpt_output(stdout: str) -> dict:
    """ms_per_iter and nanoGPT's own MFU (against an A100's bf16 peak) from bench.py's last
    `time per iteration: 123.4567ms, MFU: 1.23%` line, and the GPTConfig the shim printed (None without one)."""
    found = NANOGPT_TIME.findall(stdout)
    if not found:
        raise NanoGPTError(
            f"could not find 'time per iteration: <ms>ms' in nanoGPT's output (last line: {_last_line(stdout)[:200]!r})"
        )
    ms, mfu = found[-1]
    config = None
    for line in stdout.splitlines():
        if line.startswith(SHIM_TAG):
            config = json.loads(line[len(SHIM_TAG) :])
    return {"ms_per_iter": float(ms), "mfu_a100": float(mfu) / 100 if mfu else None, "config": config}


def run_nanogpt(
    path: Path, preset: str, compile: bool, threads: int | None, timeout: float = NANOGPT_TIMEOUT_S
) -> dict:
    """Run nanoGPT's bench.py from checkout `path` with `preset`'s shape: ms/iter over its 20 timed steps
    (after 10 burn-in), tokens/s."""
    argv, extra = nanogpt_command(path, preset, compile, threads)
    with tempfile.TemporaryDirectory(prefix="lmforge-nanogpt-shim-") as shim_dir:
        (Path(shim_dir) / "sitecustomize.py").write_text(SHIM)
        pythonpath = os.pathsep.join([shim_dir, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
        env = {**os.environ, **extra, "PYTHONPATH": pythonpath}
        try:
            proc = subprocess.run(argv, cwd=path, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NanoGPTError(f"nanoGPT's bench.py in {path} did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        why = _last_line(proc.stderr) or _last_line(proc.stdout) or "no output"
        raise NanoGPTError(f"nanoGPT's bench.py in {path} failed (exit {proc.returncode}): {why[:300]}")
    out = parse_nanogpt_output(proc.stdout)
    p = PRESETS[preset]
    want = {
        **{k: p["model"][k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")},
        "bias": False,
        "dropout": 0,
    }
    got = {k: (out["config"] or {}).get(k) for k in want}
    if got != want:
        raise NanoGPTError(f"nanoGPT's bench.py ran with GPTConfig {got}, not the preset's {want} (did the shim load?)")
    B, T = p["batch"], p["model"]["block_size"]
    return {
        "ms_per_iter": out["ms_per_iter"],
        "tokens_per_s": B * T / (out["ms_per_iter"] / 1000),
        "mfu_a100": out["mfu_a100"],
    }


def nanogpt_commit(path: Path) -> str | None:
    """HEAD of the checkout when `path` is the top of a git work tree, else None."""
    if not (Path(path) / ".git").exists():
        return None
    try:
        return (
            subprocess.run(
                ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.CalledProcessError):
        return None


def run(
    preset: str,
    compile: bool,
    steps: int,
    warmup: int,
    fused_loss: str,
    threads: int | None,
    repeat: int = 1,
    nanogpt: str | Path | None = None,
    log=None,
) -> dict:
    """`measure()` `repeat` times, alternating with nanoGPT's bench.py when `nanogpt` is a checkout; medians.

    The result is the last run's `measure()` dict with tokens_per_s / ms_per_iter / mfu replaced by medians, plus the
    per-run figures and, with nanoGPT, nanogpt_tokens_per_s, nanogpt_ms_per_iter (medians) and ratio_vs_nanogpt
    (median lmforge tokens/s / median nanoGPT tokens/s).
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    if nanogpt is not None:
        nanogpt = nanogpt_checkout(nanogpt)
        threads = threads or torch.get_num_threads()  # both sides get the same thread count
    ours, theirs = [], []
    for i in range(repeat):
        ours.append(measure(preset, compile, steps, warmup, fused_loss, threads))
        line = f"{time.strftime('%H:%M:%S')} run {i + 1}/{repeat}: lmforge {ours[-1]['tokens_per_s']:,.0f} tokens/s"
        if nanogpt is not None:
            theirs.append(run_nanogpt(nanogpt, preset, compile, threads))
            line += f", nanoGPT {theirs[-1]['tokens_per_s']:,.0f} tokens/s"
        if log:
            log(line)
    r = dict(ours[-1])
    med = {k: statistics.median(o[k] for o in ours) for k in ("tokens_per_s", "ms_per_iter")}
    r.update(
        tokens_per_s=round(med["tokens_per_s"], 1),
        ms_per_iter=round(med["ms_per_iter"], 2),
        warmup=warmup,
        threads=torch.get_num_threads(),
        runs=repeat,
    )
    if r["mfu"] is not None:
        r["mfu"] = round(statistics.median(o["mfu"] for o in ours), 4)
    if repeat > 1:
        r["tokens_per_s_runs"] = [o["tokens_per_s"] for o in ours]
    if nanogpt is not None:
        tps, ms = (
            statistics.median(t["tokens_per_s"] for t in theirs),
            statistics.median(t["ms_per_iter"] for t in theirs),
        )
        r.update(
            nanogpt_tokens_per_s=round(tps, 1),
            nanogpt_ms_per_iter=round(ms, 2),
            ratio_vs_nanogpt=round(med["tokens_per_s"] / tps, 3),
            nanogpt_steps=NANOGPT_STEPS,
            nanogpt_warmup=NANOGPT_WARMUP,
            nanogpt_commit=nanogpt_commit(nanogpt),
        )
        if repeat > 1:
            r["nanogpt_tokens_per_s_runs"] = [round(t["tokens_per_s"], 1) for t in theirs]
            r["ratio_runs"] = [round(o["tokens_per_s"] / t["tokens_per_s"], 3) for o, t in zip(ours, theirs)]
    return r


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, list):
        return " · ".join(_cell(x) for x in v)
    return f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="nanogpt-cpu")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the model (nanoGPT's too with --compare-nanogpt)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (default 20 on CPU, 50 on GPU; 20 with --compare-nanogpt)"
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default 3 on CPU, 10 on GPU; 10 with --compare-nanogpt)",
    )
    ap.add_argument(
        "--fused-loss", choices=["auto", "on", "off"], default="auto", help="chunked LM-head + cross-entropy"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (CPU); with --compare-nanogpt, for both"
    )
    ap.add_argument(
        "--compare-nanogpt",
        metavar="PATH",
        default=None,
        help="a local karpathy/nanoGPT checkout: run its bench.py with the same shape",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs, alternating ours and nanoGPT's; medians are reported")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    gpu = PRESETS[args.preset]["device"] == "cuda"
    if (
        args.compare_nanogpt
    ):  # nanoGPT's bench.py times 20 steps after 10 burn-in steps; ours does the same unless told otherwise
        steps, warmup = args.steps or NANOGPT_STEPS, args.warmup if args.warmup is not None else NANOGPT_WARMUP
    else:
        steps = args.steps or (50 if gpu else 20)
        warmup = args.warmup if args.warmup is not None else ((15 if args.compile else 10) if gpu else 3)
    try:
        r = run(
            args.preset,
            args.compile,
            steps,
            warmup,
            args.fused_loss,
            args.threads,
            args.repeat,
            args.compare_nanogpt,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except NanoGPTError as e:
        raise SystemExit(f"train_throughput: {e}") from None
    rows = [(k, _cell(v)) for k, v in r.items()]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
