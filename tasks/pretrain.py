"""pretrain: language-model pretraining (causal or masked LM) on the memory-mapped token shards.

One process by default; with `distributed.nproc > 1` the stage restarts itself under torchrun
(DDP, or FSDP for models that do not fit one device). Resumable checkpoints are written every
`checkpoint_interval` steps; an interrupted run picks up where it stopped on the next run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import write_dir_atomically, write_lm
from models.transformer import GPT, PRESETS
from tasks import engine
from tasks.config import Paths, PretrainConfig
from tasks.errors import UserError
from tasks.plots import line_chart, publish
from tasks.tokenize import META_FILE
from tasks.tracking import NullTracker, Tracker, stage_main

CHECKPOINTS = "pretrain"
# Settings that do not change what is trained: a checkpoint written under one value resumes under another.
NOT_IN_FINGERPRINT = {"resume", "checkpoint_interval", "log_interval", "compile", "distributed", "eval_batches", "eval_interval"}


class Batches:
    """Seeded batches of the configured objective from token shards."""

    def __init__(self, data: engine.TokenShards, cfg: PretrainConfig, meta: dict, block: int) -> None:
        self.data, self.cfg, self.meta, self.block = data, cfg, meta, block

    def __call__(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.objective == "causal":
            return engine.causal_batch(self.data, n, self.block, gen)
        m = self.meta
        return engine.mlm_batch(
            self.data, n, self.block, gen, m["mask_id"], m["vocab_size"], self.cfg.mask_prob, [m["eot_id"], m["pad_id"]]
        )


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Batches, rt: engine.Runtime, batch_size: int, micro: int, n_batches: int, seed: int, fused: bool) -> float:
    """Mean loss over a fixed (seeded) set of validation windows.

    The same windows whatever the number of processes or the micro-batch size: each rank scores its
    rows of every global batch in micro-batches, and the ranks average.
    """
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    per_rank = batch_size // rt.world
    losses = []
    for _ in range(n_batches):
        x, y = batches(batch_size, gen)
        x, y = x[rt.rank * per_rank : (rt.rank + 1) * per_rank], y[rt.rank * per_rank : (rt.rank + 1) * per_rank]
        for i in range(0, per_rank, micro):
            with rt.autocast():
                loss = model(x[i : i + micro].to(rt.device), y[i : i + micro].to(rt.device), fused_loss=fused)[1]
            losses.append(loss.float())
    model.train()
    return float(engine.all_reduce_mean(torch.stack(losses).mean(), rt))


def plot_curve(history: list[dict], path: Path):
    train = [h for h in history if "train_loss" in h]
    val = [h for h in history if "val_loss" in h]
    lines = [
        ("train loss", [h["step"] for h in train], [h["train_loss"] for h in train], "-"),
        ("validation loss", [h["step"] for h in val], [h["val_loss"] for h in val], "o-"),
    ]
    return line_chart(lines, path, "step", "cross-entropy (nats/token)", "Pretraining loss")


@dataclass
class PretrainResult:
    steps: int
    params: int
    final_train_loss: float
    val_loss: float
    val_perplexity: float
    tokens_per_s: float
    train_seconds: float
    resumed_from_step: int
    mfu: float | None
    device: str

    @property
    def metrics(self) -> dict:
        return asdict(self)


def _fingerprint(cfg: PretrainConfig, model_cfg, meta: dict) -> str:
    return engine.fingerprint(cfg.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT), model_cfg.to_dict(), meta)


def _accumulation(model: torch.nn.Module, sync: bool, strategy: str):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if strategy == "fsdp" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _full_model(model: torch.nn.Module, model_cfg) -> GPT:
    """A plain CPU GPT holding the trained weights (gathers FSDP shards; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = engine.unwrap(model)
    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = GPT(model_cfg)
    if state:  # empty on ranks other than 0 under FSDP
        out.load_state_dict(state)
    return out.eval()


def run(cfg: PretrainConfig, paths: Paths, tracker: Tracker | None = None) -> PretrainResult:
    rt = engine.setup_runtime(cfg, cfg.distributed.backend)
    try:
        return _train(cfg, paths, tracker or NullTracker(), rt)
    finally:
        engine.teardown(rt)


def _train(cfg: PretrainConfig, paths: Paths, tracker: Tracker, rt: engine.Runtime) -> PretrainResult:
    from tqdm import tqdm

    meta_file = Path(paths.tokens) / META_FILE
    if not meta_file.exists():
        raise UserError(f"{meta_file}: not found (run the tokenize stage first)")
    meta = json.loads(meta_file.read_text())
    if cfg.objective == "mlm" and meta.get("mask_id") is None:
        raise UserError(f"{meta_file}: tokenizer has no <mask> token (re-run the tokenize stage)")
    causal = cfg.objective == "causal"
    model_cfg = PRESETS[cfg.model.preset](vocab_size=meta["vocab_size"], causal=causal, **cfg.model.overrides())
    train_data, val_data = engine.TokenShards(paths.tokens, "train"), engine.TokenShards(paths.tokens, "val")
    if len(train_data) <= model_cfg.block_size + 1:
        raise UserError(f"{paths.tokens}: {len(train_data)} training tokens, fewer than block_size {model_cfg.block_size}")
    if cfg.distributed.nproc != rt.world:
        raise UserError(f"params.yaml: pretrain.distributed.nproc is {cfg.distributed.nproc} but {rt.world} processes are running")
    val_block = min(model_cfg.block_size, len(val_data) - 2)
    train_batches = Batches(train_data, cfg, meta, model_cfg.block_size)
    val_batches = Batches(val_data, cfg, meta, val_block)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = GPT(model_cfg)
    n_params, flops_per_token = model.num_params(), model.flops_per_token()
    model.train()
    model = engine.wrap_model(model, rt, cfg.distributed.strategy, cfg.compile)
    opt = engine.build_optimizer(model, cfg, rt.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    fused = engine.use_fused_loss(cfg.fused_loss, rt.device)

    fp = _fingerprint(cfg, model_cfg, meta)
    ckpt_dir = Path(paths.checkpoints) / CHECKPOINTS
    state = engine.TrainState(step=0, fingerprint=fp)
    if cfg.resume == "auto" and (last := engine.latest_checkpoint(ckpt_dir, fp)) is not None:
        saved = json.loads((last / "train_state.json").read_text())["step"]
        if saved < cfg.max_steps:
            state = engine.load_checkpoint(last, model, opt, rt, gen)
            if rt.is_main:
                print(f"pretrain: resuming from {last} (step {state.step} of {cfg.max_steps})", flush=True)
    start_step, history = state.step, state.history

    per_rank = cfg.batch_size // rt.world
    micro = per_rank // cfg.grad_accum
    block = model_cfg.block_size
    tokens_per_step = cfg.batch_size * block
    val_loss = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), float("nan"))
    tracker.log_params({"device": engine.device_name(rt.device), "precision": rt.precision, "world_size": rt.world,
                        "grad_accum": cfg.grad_accum, "flops_per_token": flops_per_token, "fused_loss": fused})  # fmt: skip

    def checkpoint(step: int) -> None:
        state.step, state.history = step, history
        engine.save_checkpoint(ckpt_dir, state, model, opt, rt, gen)

    start = time.perf_counter()
    bar = tqdm(range(start_step, cfg.max_steps), desc="pretrain", unit="step", dynamic_ncols=True, disable=not rt.is_main,
               initial=start_step, total=cfg.max_steps)  # fmt: skip
    window_start, window_tokens = time.perf_counter(), 0
    last_mfu = None
    for step in bar:
        lr = engine.lr_at(step, cfg.max_steps, cfg)
        engine.set_lr(opt, lr)
        x_all, y_all = train_batches(cfg.batch_size, gen)  # the global batch; this rank takes its rows
        rows = slice(rt.rank * per_rank, (rt.rank + 1) * per_rank)
        x_all, y_all = x_all[rows], y_all[rows]
        loss_sum = torch.zeros((), device=rt.device)
        for i in range(cfg.grad_accum):
            x = x_all[i * micro : (i + 1) * micro].to(rt.device, non_blocking=True)
            y = y_all[i * micro : (i + 1) * micro].to(rt.device, non_blocking=True)
            with _accumulation(model, i == cfg.grad_accum - 1, cfg.distributed.strategy), rt.autocast():
                _, loss = model(x, y, fused_loss=fused)
                loss = loss / cfg.grad_accum
            (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
            loss_sum += loss.detach()
        grad_norm = engine.clip_and_step(model, opt, rt, cfg.grad_clip)
        window_tokens += tokens_per_step

        last = step == cfg.max_steps - 1
        if step % cfg.log_interval == 0 or last:
            train_loss = float(engine.all_reduce_mean(loss_sum, rt))
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed if elapsed > 0 else 0.0
            window_start, window_tokens = time.perf_counter(), 0
            last_mfu = engine.mfu(flops_per_token, tps, rt.device, rt.precision, rt.world)
            rec = {"step": step, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps}
            if last_mfu is not None:
                rec["mfu"] = last_mfu
            history.append(rec)
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", **({"mfu": f"{last_mfu:.1%}"} if last_mfu else {}), refresh=False)
        if step % cfg.eval_interval == 0 or last:
            val_loss = evaluate_loss(engine.unwrap(model), val_batches, rt, cfg.batch_size, micro, cfg.eval_batches, cfg.seed, fused)
            history.append({"step": step, "val_loss": val_loss})
            tracker.log_metrics({"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}, step=step)
            if rt.is_main:
                bar.write(f"step {step}: val loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}")
            window_start = time.perf_counter()  # evaluation time is not training throughput
        if last or (cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0):
            checkpoint(step + 1)
            window_start = time.perf_counter()
    bar.close()
    seconds = time.perf_counter() - start
    trained = _full_model(model, model_cfg)

    if rt.is_main:
        def fill(d: Path) -> None:
            write_lm(trained, d, extra={"train_config": cfg.model_dump(mode="json"), "objective": cfg.objective})
            (d / "history.json").write_text(json.dumps(history))
            publish(tracker, plot_curve(history, d / "loss_curve.png"), "loss_curve.png")

        write_dir_atomically(paths.lm, fill)
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    steps_run = cfg.max_steps - start_step
    return PretrainResult(
        steps=cfg.max_steps,
        params=n_params,
        final_train_loss=round(float(np.mean(train_losses[-5:])), 4),
        val_loss=round(val_loss, 4),
        val_perplexity=round(math.exp(val_loss), 3),
        tokens_per_s=round(steps_run * tokens_per_step / seconds, 1) if steps_run else 0.0,
        train_seconds=round(seconds, 2),
        resumed_from_step=start_step,
        mfu=None if last_mfu is None else round(last_mfu, 4),
        device=engine.device_name(rt.device),
    )


def _requested_processes(argv: list[str]) -> int:
    """`pretrain.distributed.nproc` from the params file named on the command line (1 if unreadable)."""
    from tasks.config import load_params
    from tasks.tracking import PARAMS_ENV

    path = argv[argv.index("--params") + 1] if "--params" in argv[:-1] else os.environ.get(PARAMS_ENV, "params.yaml")
    try:
        return load_params(path).pretrain.distributed.nproc
    except UserError:
        return 1  # stage_main reports the problem


def main() -> None:
    if not engine.under_torchrun() and (n := _requested_processes(sys.argv[1:])) > 1:
        sys.exit(engine.relaunch_under_torchrun("tasks.pretrain", n))
    stage_main("pretrain", lambda p, t: run(p.pretrain, p.paths, t).metrics)


if __name__ == "__main__":
    main()
