"""pretrain: language-model pretraining (causal or masked LM) on the memory-mapped token shards.

With `init_from` (a local Hugging Face GPT-2 folder, models/hf.py) training starts from that checkpoint's weights and
shape instead of a new model; with `max_steps: 0` as well, the stage only scores the imported LM on the validation
split and writes it as `paths.lm`, so finetune starts from it.

One process by default; with `distributed.nproc > 1` the stage restarts itself under torchrun
(DDP, or FSDP for models that do not fit one device). Resumable checkpoints are written every
`checkpoint_interval` steps; an interrupted run picks up where it stopped on the next run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import write_lm
from models.hf import read_hf_gpt2
from models.transformer import GPT, PRESETS, GPTConfig
from tasks.shared.config.base import Paths
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.engine.checkpoints import (
    TrainState,
    clear_checkpoints,
    fingerprint,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from tasks.shared.engine.data import TokenShards, causal_batch, mlm_batch
from tasks.shared.engine.optim import build_optimizer, lr_at, set_lr
from tasks.shared.engine.runtime import (
    PrecisionProbe,
    Runtime,
    all_reduce_mean,
    device_name,
    probe_cpu_precision,
    relaunch_under_torchrun,
    setup_runtime,
    teardown,
    under_torchrun,
    unwrap,
    wrap_model,
)
from tasks.shared.engine.step import (
    Throughput,
    check_finite,
    lm_loss,
    mfu,
    step_throughput,
    train_step,
    use_fused_loss,
)
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir, write_csv
from tasks.shared.plots import line_chart, publish
from tasks.shared.shards import META_FILE, read_meta
from tasks.shared.tracking import NullTracker, Tracker

SECTIONS = {"pretrain": PretrainConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
CHECKPOINTS = "pretrain"
TRAIN_LOSS_PLOT = "pretrain_train_loss.csv"
VAL_LOSS_PLOT = "pretrain_val_loss.csv"
"""Plot data in `paths.plots` (dvc.yaml `plots:`), overlaid across commits by `dvc plots diff`."""
TIMINGS = ("tokens_per_s", "mfu")
"""Logged values that differ between two runs of the same training: kept out of the model folder."""
# Settings that do not change what is trained: a checkpoint written under one value resumes under another.
NOT_IN_FINGERPRINT = {
    "resume",
    "checkpoint_interval",
    "log_interval",
    "compile",
    "distributed",
    "eval_batches",
    "eval_interval",
}


class Batches:
    """Seeded batches of the configured objective from token shards."""

    def __init__(self, data: TokenShards, cfg: PretrainConfig, meta: dict, block: int) -> None:
        self.data, self.cfg, self.meta, self.block = data, cfg, meta, block

    def __call__(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.objective == "causal":
            return causal_batch(self.data, n, self.block, gen)
        m = self.meta
        return mlm_batch(
            self.data, n, self.block, gen, m["mask_id"], m["vocab_size"], self.cfg.mask_prob, [m["eot_id"], m["pad_id"]]
        )


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Batches,
    rt: Runtime,
    batch_size: int,
    micro: int,
    n_batches: int,
    seed: int,
    fused: bool,
) -> float:
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
    return float(all_reduce_mean(torch.stack(losses).mean(), rt))


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
    final_train_loss: float | None
    """Mean of the last 5 logged training losses; None without training (`max_steps: 0`)."""
    val_loss: float
    val_perplexity: float
    tokens_per_s: float
    """Training throughput: tokens of the timed steps / their time (evaluation and checkpoints excluded)."""
    wall_tokens_per_s: float
    """Tokens of every step run / the loop's wall time (evaluation and checkpoints included)."""
    train_seconds: float
    resumed_from_step: int
    mfu: float | None
    device: str
    precision: str
    """fp32 / bf16 / fp16: what trained (`precision: auto` on CPU is timed per shape, see precision_probe_*_ms)."""
    precision_probe_fp32_ms: float | None
    precision_probe_bf16_ms: float | None
    engine_tokens_per_s: float | None
    """The engine benchmark's figure for this model (`step_throughput`: bare steps on random tokens), mean of
    a measurement before and after the loop; None with several processes."""
    loop_efficiency: float | None
    """tokens_per_s / engine_tokens_per_s: what batch assembly, logging and bookkeeping leave of the bare step."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


def _fingerprint(cfg: PretrainConfig, model_cfg, meta: dict) -> str:
    return fingerprint(cfg.model_dump(mode="json", exclude=NOT_IN_FINGERPRINT), model_cfg.to_dict(), meta)


def _full_model(model: torch.nn.Module, model_cfg) -> GPT:
    """A plain CPU GPT holding the trained weights (gathers FSDP shards; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    inner = unwrap(model)
    state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = GPT(model_cfg)
    if state:  # empty on ranks other than 0 under FSDP
        out.load_state_dict(state)
    return out.eval()


def run(cfg: PretrainConfig, paths: Paths, tracker: Tracker | None = None) -> PretrainResult:
    rt = setup_runtime(cfg, cfg.distributed.backend)
    try:
        if cfg.max_steps == 0:
            return _import_only(cfg, paths, tracker or NullTracker(), rt)
        return _train(cfg, paths, tracker or NullTracker(), rt)
    finally:
        teardown(rt)


def imported_lm(folder: str, meta: dict, tokens: Path) -> GPT:
    """The LM of Hugging Face checkpoint `folder`, checked against the tokenizer the token shards were encoded with."""
    model, tok = read_hf_gpt2(folder)
    if tok.get_vocab_size() != meta["vocab_size"]:
        raise UserError(
            f"{Path(tokens) / META_FILE}: vocab_size {meta['vocab_size']} is not init_from's tokenizer's "
            f"({tok.get_vocab_size()}): re-run the tokenize stage (dvc repro tokenize)"
        )
    return model


def _import_only(cfg: PretrainConfig, paths: Paths, tracker: Tracker, rt: Runtime) -> PretrainResult:
    """`max_steps: 0`: score `init_from`'s LM on the validation split and write it as `paths.lm` unchanged."""
    meta = read_meta(paths.tokens)
    model = imported_lm(cfg.init_from, meta, paths.tokens).to(rt.device)
    val_data = TokenShards(paths.tokens, "val")
    batches = Batches(val_data, cfg, meta, min(model.config.block_size, len(val_data) - 2))
    micro = cfg.batch_size // rt.world // cfg.grad_accum
    val_loss = evaluate_loss(model, batches, rt, cfg.batch_size, micro, cfg.eval_batches, cfg.seed, fused=False)
    tracker.log_metrics({"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}, step=0)
    history = [{"step": 0, "val_loss": val_loss}]
    if rt.is_main:
        with atomic_dir(paths.lm) as d:
            extra = {"train_config": cfg.model_dump(mode="json"), "objective": cfg.objective}
            write_lm(model.cpu().eval(), d, extra=extra)
            (d / "history.json").write_text(json.dumps(history))
        write_plot_data(history, paths.plots)
    return PretrainResult(
        steps=0,
        params=model.num_params(),
        final_train_loss=None,
        val_loss=round(val_loss, 4),
        val_perplexity=round(math.exp(val_loss), 3),
        tokens_per_s=0.0,
        wall_tokens_per_s=0.0,
        train_seconds=0.0,
        resumed_from_step=0,
        mfu=None,
        device=device_name(rt.device),
        precision="fp32",
        precision_probe_fp32_ms=None,
        precision_probe_bf16_ms=None,
        engine_tokens_per_s=None,
        loop_efficiency=None,
    )


# ---------------------------------------------------------------------------------------------
# setup: data, model, optimizer, resume


@dataclass
class Setup:
    """Everything the loop needs, built once by `_setup`."""

    rt: Runtime
    """The runtime this model trains in (`precision: auto` on CPU: as the probe chose)."""
    model_cfg: GPTConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    train_batches: Batches
    val_batches: Batches
    fused: bool
    loss_of: Callable[[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    """A micro-batch (inputs, targets) -> its loss, for `train_step`."""
    per_rank: int
    """Rows of each global batch this process trains on."""
    micro: int
    """Rows per forward pass."""
    tokens_per_step: int
    """Tokens of one optimizer step over all processes."""
    n_params: int
    flops_per_token: float
    state: TrainState
    """Step to start from and the loss history so far (a resumed run continues its curve)."""
    ckpt_dir: Path
    probe: PrecisionProbe
    """How `precision: auto` was resolved (CPU: timed on this model)."""


def _unusable_report(unusable: list[tuple[Path, str]], resume_from: str | None) -> list[str]:
    """One line per checkpoint that failed verification, the last saying what happens instead."""
    lines = [f"pretrain: checkpoint {p} is unusable ({why})" for p, why in unusable]
    if lines:
        lines[-1] += (
            f"; resuming from {resume_from}" if resume_from else "; no usable checkpoint, starting from scratch"
        )
    return lines


def _setup(cfg: PretrainConfig, paths: Paths, rt: Runtime) -> Setup:
    meta = read_meta(paths.tokens)
    if cfg.objective == "mlm" and meta.get("mask_id") is None:
        raise UserError(f"{Path(paths.tokens) / META_FILE}: tokenizer has no <mask> token (re-run the tokenize stage)")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    if cfg.init_from:
        model = imported_lm(cfg.init_from, meta, paths.tokens)
        model_cfg = model.config
    else:
        model_cfg = PRESETS[cfg.model.preset](
            vocab_size=meta["vocab_size"], causal=cfg.objective == "causal", **cfg.model.overrides()
        )
        model = GPT(model_cfg)
    train_data, val_data = TokenShards(paths.tokens, "train"), TokenShards(paths.tokens, "val")
    if len(train_data) <= model_cfg.block_size + 1:
        raise UserError(
            f"{paths.tokens}: {len(train_data)} training tokens, fewer than block_size {model_cfg.block_size}"
        )
    if cfg.distributed.world != rt.world:
        raise UserError(
            f"params.yaml: pretrain.distributed asks for {cfg.distributed.nproc} process(es) "
            f"on {cfg.distributed.nnodes} node(s) but {rt.world} are running"
        )

    n_params, flops_per_token = model.num_params(), model.flops_per_token()
    model.train()
    train_batches = Batches(train_data, cfg, meta, model_cfg.block_size)
    fused = use_fused_loss(cfg.fused_loss, rt.device)
    micro = cfg.batch_size // rt.world // cfg.grad_accum
    x, y = train_batches(micro, torch.Generator().manual_seed(cfg.seed + 1))  # not the training stream
    probe = probe_cpu_precision(rt, cfg.precision, model, lambda: model(x, y, fused_loss=fused)[1], "pretrain")
    rt = rt.with_precision(probe.chosen)
    model = wrap_model(model, rt, cfg.distributed.strategy, cfg.compile)
    opt = build_optimizer(model, cfg, rt.device)
    gen = torch.Generator().manual_seed(cfg.seed)

    fp = _fingerprint(cfg, model_cfg, meta)
    ckpt_dir = Path(paths.checkpoints) / CHECKPOINTS
    state = TrainState(step=0, fingerprint=fp)
    if cfg.resume == "auto":
        found, unusable = latest_checkpoint(ckpt_dir, fp)
        resume = found is not None and found.step < cfg.max_steps  # a finished run trains afresh
        if rt.is_main:
            for line in _unusable_report(unusable, found.path.name if resume else None):
                print(line, flush=True)
        if resume:
            state = restore_checkpoint(found, model, opt, rt, gen)
            if rt.is_main:
                print(f"pretrain: resuming from {found.path} (step {state.step} of {cfg.max_steps})", flush=True)
    if state.step == 0 and (removed := clear_checkpoints(ckpt_dir, rt)) and rt.is_main:
        # a finished run's (or another config's) checkpoints would outrank this run's and be kept in their stead
        print(
            f"pretrain: starting afresh; removed {removed} checkpoint(s) of an earlier run from {ckpt_dir}", flush=True
        )
    per_rank = cfg.batch_size // rt.world
    return Setup(
        rt=rt,
        model_cfg=model_cfg,
        model=model,
        opt=opt,
        gen=gen,
        train_batches=train_batches,
        val_batches=Batches(val_data, cfg, meta, min(model_cfg.block_size, len(val_data) - 2)),
        fused=fused,
        loss_of=lm_loss(model, rt.device, fused),
        per_rank=per_rank,
        micro=micro,
        tokens_per_step=cfg.batch_size * model_cfg.block_size,
        n_params=n_params,
        flops_per_token=flops_per_token,
        state=state,
        ckpt_dir=ckpt_dir,
        probe=probe,
    )


# ---------------------------------------------------------------------------------------------
# one optimizer step, logging, evaluation


def _step(s: Setup, cfg: PretrainConfig, rt: Runtime, step: int) -> tuple[torch.Tensor, float, float]:
    """One optimizer step on this rank's rows of the global batch; returns (loss on device, grad norm, lr)."""
    lr = lr_at(step, cfg.max_steps, cfg)
    set_lr(s.opt, lr)
    x_all, y_all = s.train_batches(cfg.batch_size, s.gen)  # every rank draws the global batch
    rows = slice(rt.rank * s.per_rank, (rt.rank + 1) * s.per_rank)
    x_all, y_all = x_all[rows], y_all[rows]
    parts = [slice(i * s.micro, (i + 1) * s.micro) for i in range(cfg.grad_accum)]
    micro_batches = [(x_all[part], y_all[part]) for part in parts]
    loss, grad_norm = train_step(s.model, s.opt, rt, micro_batches, s.loss_of, cfg.grad_clip)
    return loss, grad_norm, lr


def _log_train(
    s: Setup,
    rt: Runtime,
    tracker: Tracker,
    meter: Throughput,
    step: int,
    loss: torch.Tensor,
    grad_norm: float,
    lr: float,
) -> dict:
    """Record the step's loss, lr, grad norm and the window's tokens/s (and MFU on a known GPU)."""
    rec = {"step": step, "train_loss": float(all_reduce_mean(loss, rt)), "lr": lr, "grad_norm": grad_norm}
    tps = meter.window_rate()
    if tps is not None:
        rec["tokens_per_s"] = tps
        if (m := mfu(s.flops_per_token, tps, rt.device, rt.precision, rt.world)) is not None:
            rec["mfu"] = m
    s.state.history.append(rec)
    tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
    return rec


def _log_eval(s: Setup, cfg: PretrainConfig, rt: Runtime, tracker: Tracker, step: int) -> float:
    val_loss = evaluate_loss(
        unwrap(s.model), s.val_batches, rt, cfg.batch_size, s.micro, cfg.eval_batches, cfg.seed, s.fused
    )
    s.state.history.append({"step": step, "val_loss": val_loss})
    tracker.log_metrics({"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}, step=step)
    return val_loss


def write_plot_data(history: list[dict], folder: Path) -> None:
    """Loss curves as CSV for `dvc plots` (train every `log_interval` steps, validation every `eval_interval`)."""
    write_csv(Path(folder) / TRAIN_LOSS_PLOT, [h for h in history if "train_loss" in h], ["step", "train_loss"])
    write_csv(Path(folder) / VAL_LOSS_PLOT, [h for h in history if "val_loss" in h], ["step", "val_loss"])


# ---------------------------------------------------------------------------------------------
# the loop


def _train(cfg: PretrainConfig, paths: Paths, tracker: Tracker, rt: Runtime) -> PretrainResult:
    from tqdm import tqdm

    s = _setup(cfg, paths, rt)
    rt = s.rt  # in the precision the probe chose
    start_step, history = s.state.step, s.state.history
    if rt.is_main and s.probe.fp32_s is not None:
        print(f"pretrain: precision {rt.precision} ({s.probe.reason})", flush=True)
    tracker.log_params(
        {
            "device": device_name(rt.device),
            "precision": rt.precision,
            "world_size": rt.world,
            "grad_accum": cfg.grad_accum,
            "flops_per_token": s.flops_per_token,
            "fused_loss": s.fused,
        }
    )
    val_loss = next((h["val_loss"] for h in reversed(history) if "val_loss" in h), float("nan"))
    bench = (
        (lambda: step_throughput(s.model, cfg, rt, s.micro, s.model_cfg.block_size, s.model_cfg.vocab_size, s.fused))
        if rt.world == 1
        else None
    )
    engine_rates = [bench()] if bench else []
    meter = Throughput(rt.device)
    last_mfu = None
    start = time.perf_counter()
    bar = tqdm(
        range(start_step, cfg.max_steps),
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
        disable=not rt.is_main,
        initial=start_step,
        total=cfg.max_steps,
    )
    for step in bar:
        loss, grad_norm, lr = _step(s, cfg, rt, step)
        meter.step(s.tokens_per_step)
        last = step == cfg.max_steps - 1
        save = last or bool(cfg.checkpoint_interval and (step + 1) % cfg.checkpoint_interval == 0)
        train_loss = None  # read from the device only where it is logged or a checkpoint follows
        if step % cfg.log_interval == 0 or last:
            rec = _log_train(s, rt, tracker, meter, step, loss, grad_norm, lr)
            train_loss, last_mfu = rec["train_loss"], rec.get("mfu", last_mfu)
            tok_s = {"tok_s": f"{rec['tokens_per_s']:,.0f}"} if "tokens_per_s" in rec else {}
            bar.set_postfix(
                loss=f"{rec['train_loss']:.3f}",
                **tok_s,
                **({"mfu": f"{last_mfu:.1%}"} if last_mfu else {}),
                refresh=False,
            )
        elif save:
            train_loss = float(all_reduce_mean(loss, rt))
        check_finite("pretrain", step, lr, rt, cfg.grad_clip, loss=train_loss, grad_norm=grad_norm)
        if step % cfg.eval_interval == 0 or last:
            with meter.paused():  # evaluation time is not training throughput
                val_loss = _log_eval(s, cfg, rt, tracker, step)
            if rt.is_main:
                bar.write(f"step {step}: val loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}")
        if save:
            with meter.paused():
                s.state.step = step + 1
                save_checkpoint(s.ckpt_dir, s.state, s.model, s.opt, rt, s.gen)
    bar.close()
    seconds = time.perf_counter() - start
    tokens_per_s = meter.overall_rate()
    if bench:
        engine_rates.append(bench())
    engine_tps = float(np.mean(engine_rates)) if engine_rates else None
    if rt.is_main and engine_tps and tokens_per_s:
        print(
            f"pretrain: {tokens_per_s:,.0f} tokens/s in the loop, "
            f"{engine_tps:,.0f} for the bare engine step ({tokens_per_s / engine_tps:.0%})",
            flush=True,
        )
    trained = _full_model(s.model, s.model_cfg)

    if rt.is_main:
        with atomic_dir(paths.lm) as d:
            write_lm(trained, d, extra={"train_config": cfg.model_dump(mode="json"), "objective": cfg.objective})
            # the curve without timings: the same training gives the same bytes, so finetune is not rerun
            (d / "history.json").write_text(
                json.dumps([{k: v for k, v in h.items() if k not in TIMINGS} for h in history])
            )
            publish(tracker, plot_curve(history, d / "loss_curve.png"), "loss_curve.png")
        write_plot_data(history, paths.plots)
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    steps_run = cfg.max_steps - start_step
    return PretrainResult(
        steps=cfg.max_steps,
        params=s.n_params,
        final_train_loss=round(float(np.mean(train_losses[-5:])), 4),
        val_loss=round(val_loss, 4),
        val_perplexity=round(math.exp(val_loss), 3),
        tokens_per_s=round(tokens_per_s or 0.0, 1),
        wall_tokens_per_s=round(steps_run * s.tokens_per_step / seconds, 1) if steps_run else 0.0,
        train_seconds=round(seconds, 2),
        resumed_from_step=start_step,
        mfu=None if last_mfu is None else round(last_mfu, 4),
        device=device_name(rt.device),
        **s.probe.metrics(),
        engine_tokens_per_s=None if engine_tps is None else round(engine_tps, 1),
        loop_efficiency=round(tokens_per_s / engine_tps, 3) if engine_tps and tokens_per_s else None,
    )


def _requested_launch(argv: list[str]):
    """`pretrain.distributed` from the params file named on the command line (None if unreadable)."""
    from tasks.shared.config.base import load_stage_params
    from tasks.shared.tracking import PARAMS_ENV

    path = argv[argv.index("--params") + 1] if "--params" in argv[:-1] else os.environ.get(PARAMS_ENV, "params.yaml")
    try:
        return load_stage_params(path, SECTIONS).pretrain.distributed
    except UserError:
        return None  # stage_main reports the problem


def main() -> None:
    if not under_torchrun() and (dist := _requested_launch(sys.argv[1:])) is not None and dist.launched:
        sys.exit(relaunch_under_torchrun("tasks.pretrain", dist))
    stage_main(
        "pretrain",
        lambda p, t: run(p.pretrain, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("tokens",)),
    )


if __name__ == "__main__":
    main()
