"""pretrain: causal-LM pretraining of the decoder-only Transformer on the memory-mapped token ids."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import write_dir_atomically, write_lm
from models.transformer import GPT, PRESETS
from tasks.config import Paths, PretrainConfig
from tasks.errors import UserError
from tasks.tokenize import META_FILE, load_tokens
from tasks.tracking import NullTracker, Tracker, stage_main


def lr_at(step: int, max_steps: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def get_batch(data: np.ndarray, batch_size: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs (B, T) and next-token targets (B, T)."""
    starts = torch.randint(len(data) - block - 1, (batch_size,), generator=gen).numpy()
    windows = np.stack([data[s : s + block + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def optimizer_for(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate_loss(model: GPT, data: np.ndarray, batch_size: int, batches: int, seed: int) -> float:
    """Mean loss over a fixed (seeded) set of validation windows."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    block = min(model.config.block_size, len(data) - 2)
    losses = [model(*get_batch(data, batch_size, block, gen))[1].item() for _ in range(batches)]
    model.train()
    return float(np.mean(losses))


def plot_curve(history: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [h for h in history if "train_loss" in h]
    val = [h for h in history if "val_loss" in h]
    ax.plot([h["step"] for h in train], [h["train_loss"] for h in train], label="train loss")
    ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


@dataclass
class PretrainResult:
    steps: int
    params: int
    final_train_loss: float
    val_loss: float
    val_perplexity: float
    tokens_per_s: float
    train_seconds: float

    @property
    def metrics(self) -> dict:
        return self.__dict__.copy()


def run(cfg: PretrainConfig, paths: Paths, tracker: Tracker | None = None) -> PretrainResult:
    from tqdm import tqdm

    tracker = tracker or NullTracker()
    meta_file = Path(paths.tokens) / META_FILE
    if not meta_file.exists():
        raise UserError(f"{meta_file}: not found (run the tokenize stage first)")
    meta = json.loads(meta_file.read_text())
    train, val = load_tokens(paths.tokens, "train"), load_tokens(paths.tokens, "val")
    model_cfg = PRESETS[cfg.model.preset](vocab_size=meta["vocab_size"], **cfg.model.overrides())
    if len(train) <= model_cfg.block_size + 1:
        raise UserError(f"{paths.tokens}/train.bin: {len(train)} tokens, fewer than block_size {model_cfg.block_size}")

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = GPT(model_cfg)
    model.train()
    opt = optimizer_for(model, cfg.lr, cfg.weight_decay)
    tokens_per_step = cfg.batch_size * model_cfg.block_size
    history: list[dict] = []
    val_loss = float("nan")
    start = time.perf_counter()
    bar = tqdm(range(cfg.max_steps), desc="pretrain", unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    for step in bar:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train, cfg.batch_size, model_cfg.block_size, gen)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt.step()
        window_tokens += tokens_per_step

        last = step == cfg.max_steps - 1
        if step % cfg.log_interval == 0 or last:
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed if elapsed > 0 else 0.0
            window_start, window_tokens = time.perf_counter(), 0
            rec = {"step": step, "train_loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps}
            history.append(rec)
            tracker.log_metrics({k: v for k, v in rec.items() if k != "step"}, step=step)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if step % cfg.eval_interval == 0 or last:
            val_loss = evaluate_loss(model, val, cfg.batch_size, cfg.eval_batches, cfg.seed)
            history.append({"step": step, "val_loss": val_loss})
            tracker.log_metrics({"val_loss": val_loss, "val_perplexity": math.exp(val_loss)}, step=step)
            bar.write(f"step {step}: val loss {val_loss:.3f}, perplexity {math.exp(val_loss):.1f}")
    bar.close()
    seconds = time.perf_counter() - start

    def fill(d: Path) -> None:
        write_lm(model, d, extra={"train_config": cfg.model_dump(mode="json")})
        (d / "history.json").write_text(json.dumps(history))
        tracker.log_figure(plot_curve(history, d / "loss_curve.png"), "loss_curve.png")

    write_dir_atomically(paths.lm, fill)
    train_losses = [h["train_loss"] for h in history if "train_loss" in h]
    return PretrainResult(
        steps=cfg.max_steps,
        params=model.num_params(),
        final_train_loss=round(float(np.mean(train_losses[-5:])), 4),
        val_loss=round(val_loss, 4),
        val_perplexity=round(math.exp(val_loss), 3),
        tokens_per_s=round(cfg.max_steps * tokens_per_step / seconds, 1),
        train_seconds=round(seconds, 2),
    )


def main() -> None:
    stage_main("pretrain", lambda p, t: run(p.pretrain, p.paths, t).metrics)


if __name__ == "__main__":
    main()
