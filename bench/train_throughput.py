"""Training throughput of the lmforge engine on synthetic tokens (warm-up steps excluded).

    python bench/train_throughput.py --preset nanogpt-cpu
    python bench/train_throughput.py --preset gpt2-124m --compile          # on a GPU

Prints a table and, as its last line, a JSON object with tokens_per_s, mfu, ms_per_iter, device.
The presets copy nanoGPT's benchmark settings so the numbers compare with nanoGPT's `bench.py`
on the same machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.transformer import GPT, GPTConfig  # noqa: E402
from tasks.shared import engine  # noqa: E402
from tasks.shared.config.pretrain import PretrainConfig  # noqa: E402

PRESETS = {
    # nanoGPT bench.py shrunk for a CPU: 4 x 128, block 64, batch 12, GPT-2 vocabulary, fp32, no compile.
    "nanogpt-cpu": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=50304), batch=12, device="cpu", precision="fp32"),
    # The pipeline's CPU default (params.yaml: preset small, 4096-token BPE vocabulary, batch 16).
    "cpu-default": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=4096), batch=16, device="cpu", precision="fp32"),
    # GPT-2 small as in nanoGPT bench.py: batch 16 x 1024 tokens, bf16 autocast.
    "gpt2-124m": dict(model=dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), batch=16, device="cuda", precision="bf16"),
}


def measure(preset: str, compile: bool, steps: int, warmup: int, fused_loss: str, threads: int | None) -> dict:
    p = PRESETS[preset]
    if threads:
        torch.set_num_threads(threads)
    if p["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset} needs a CUDA GPU")
    cfg = PretrainConfig(device=p["device"], precision=p["precision"], compile=compile, lr=6e-4, min_lr=6e-5, fused_loss=fused_loss)
    rt = engine.setup_runtime(cfg)
    torch.manual_seed(0)
    model_cfg = GPTConfig(**p["model"])
    model = GPT(model_cfg)
    flops_per_token = model.flops_per_token()
    n_params = model.num_params()
    model = engine.wrap_model(model, rt, "ddp", compile)
    opt = engine.build_optimizer(model, cfg, rt.device)
    fused = engine.use_fused_loss(fused_loss, rt.device)
    B, T = p["batch"], model_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(model_cfg.vocab_size, (steps + warmup, B, T + 1), generator=gen)

    def step(i: int) -> float:
        x, y = data[i, :, :-1].to(rt.device, non_blocking=True), data[i, :, 1:].to(rt.device, non_blocking=True)
        with rt.autocast():
            _, loss = model(x, y, fused_loss=fused)
        loss.backward()
        engine.clip_and_step(model, opt, rt, 1.0)
        return loss

    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        loss = step(i)
    final_loss = float(loss)
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * B * T / seconds
    m = engine.mfu(flops_per_token, tokens_per_s, rt.device, rt.precision)
    return {
        "preset": preset,
        "device": engine.device_name(rt.device),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="nanogpt-cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CPU, 50 on GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CPU, 10 on GPU)")
    ap.add_argument("--fused-loss", choices=["auto", "on", "off"], default="auto", help="chunked LM-head + cross-entropy")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    gpu = PRESETS[args.preset]["device"] == "cuda"
    steps = args.steps or (50 if gpu else 20)
    warmup = args.warmup if args.warmup is not None else ((15 if args.compile else 10) if gpu else 3)
    r = measure(args.preset, args.compile, steps, warmup, args.fused_loss, args.threads)
    rows = [(k, "n/a" if v is None else f"{v:,}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)) for k, v in r.items()]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 30}")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
