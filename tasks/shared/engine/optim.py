"""Optimizers, parameter groups (weight decay, layer-wise lr) and learning-rate schedules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from tasks.shared.config.training import TrainLoop


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
