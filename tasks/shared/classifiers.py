"""The classifiers a stage trains, built the way finetune builds them: the pretrained Transformer (its frozen part
and layer-wise lr) and the baselines, each with its recipe: from scratch (`scratch`, `cnn`, `gru`), or the
pretrained Transformer reading at most `LONG_TOKENS` tokens (`short`, the 128-token model).

Shared by finetune (one model each, on every training example) and the learning curve (the same models on
k examples per label), so that both train exactly the same thing.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.classifier import ClassifierConfig, TransformerClassifier
from models.tokenizer import LONG_TOKENS
from models.transformer import GPT, GPTConfig
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.errors import UserError
from tasks.shared.variants import SHORT_BASELINE


def freeze_trunk(model: TransformerClassifier, freeze: str | int) -> list[str]:
    """Turn off gradients for the frozen part of the trunk (see `FinetuneConfig.freeze`); returns the frozen names."""
    trunk = model.trunk
    embeddings = [m for m in (trunk.wte, trunk.wpe) if m is not None]
    if freeze == "none":
        frozen: list[nn.Module] = []
    elif freeze == "embeddings":
        frozen = embeddings
    elif freeze == "trunk":
        frozen = [trunk]
    else:
        if freeze > len(trunk.blocks):
            raise UserError(f"params.yaml: finetune.freeze: {freeze} exceeds the LM's {len(trunk.blocks)} blocks")
        frozen = [*embeddings, *trunk.blocks[:freeze]] if freeze else []  # 0 blocks: nothing, like `none`
    for module in frozen:
        module.requires_grad_(False)
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def layer_lr_scales(model: TransformerClassifier, decay: float) -> dict[str, float]:
    """lr multiplier per parameter: 1 for the head and final norm, decay**k for the k-th block from the
    top, decay**(n_layer + 1) for the embeddings."""
    n_layer = len(model.trunk.blocks)
    scales = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["trunk", "blocks"]:
            depth = n_layer - int(parts[2])
        elif parts[1] in ("wte", "wpe") and parts[0] == "trunk":
            depth = n_layer + 1
        else:
            depth = 0
        scales[name] = decay**depth
    return scales


def read_longer(lm: GPT, cfg: FinetuneConfig) -> GPT:
    """`lm`, or when `cfg.max_length` is past its block size a copy that reads that far: positions extended
    (learned ones tiled), local attention in windows (or chunks, `cfg.attn_chunked`) of `cfg.attn_window` tokens
    with `cfg.attn_global` global tokens."""
    c = lm.config
    if cfg.max_length <= c.block_size:
        return lm
    longer = copy.deepcopy(lm)
    window = cfg.attn_window or c.attn_window or c.block_size
    longer.extend_positions(cfg.max_length, window, cfg.attn_global, cfg.attn_chunked)
    return longer


def pretrained_classifier(
    lm: GPT, labels: list[str], cfg: FinetuneConfig
) -> tuple[TransformerClassifier, dict[str, float] | None, int]:
    """A head on the pretrained trunk `lm` read at `cfg.max_length` (`read_longer`), seeded with `cfg.seed` and
    frozen as `cfg.freeze` says: the model, its per-parameter lr scales (None: layer-wise decay off) and its trainable
    parameter count."""
    lm = read_longer(lm, cfg)
    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(ClassifierConfig(trunk=lm.config, labels=labels, pooling=cfg.pooling))
    model.trunk.load_state_dict(lm.state_dict())
    frozen = set(freeze_trunk(model, cfg.freeze))
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    scales = layer_lr_scales(model, cfg.layer_lr_decay) if cfg.layer_lr_decay < 1 else None
    return model, scales, trainable


def baseline_model(name: str, cfg: FinetuneConfig, trunk: GPTConfig, labels: list[str]) -> nn.Module:
    """A freshly initialised baseline classifier (seeded with `cfg.seed`)."""
    torch.manual_seed(cfg.seed)
    if name == "scratch":
        return TransformerClassifier(ClassifierConfig(trunk=trunk, labels=labels, pooling=cfg.pooling))
    common = {"vocab_size": trunk.vocab_size, "labels": labels, "dropout": cfg.baseline_dropout}
    if name == "cnn":
        return CNNClassifier(
            CNNConfig(n_embd=cfg.cnn_embd, channels=cfg.cnn_channels, kernel_sizes=cfg.cnn_kernel_sizes, **common)
        )
    if name == "gru":
        return GRUClassifier(GRUConfig(n_embd=cfg.gru_embd, hidden=cfg.gru_hidden, pooling=cfg.pooling, **common))
    raise ValueError(f"unknown baseline {name!r}")


def build_baseline(
    name: str, recipe: FinetuneConfig, lm: GPT, labels: list[str]
) -> tuple[nn.Module, dict[str, float] | None]:
    """Baseline `name` built for its `recipe` (`baseline_recipe`) and its per-parameter lr scales (None: one lr).

    `short` is `pretrained_classifier` (frozen part, layer-wise lr decay); the others start from random weights.
    """
    if name == SHORT_BASELINE:
        model, scales, _ = pretrained_classifier(lm, labels, recipe)
        return model, scales
    return baseline_model(name, recipe, read_longer(lm, recipe).config, labels), None


def baseline_recipe(name: str, cfg: FinetuneConfig) -> tuple[FinetuneConfig, int, str]:
    """How baseline `name` trains: its recipe, its epochs and the params.yaml key of its lr (named when it diverges).

    The recipe's `max_length` is what the baseline reads, in training and when served. Baselines from scratch
    train every layer at one lr: freezing and layer-wise decay only make sense for pretrained weights.
    `scratch` keeps finetune's recipe (what pretraining buys); small models from scratch want their own lr and
    epochs (`baseline_lr`, `baseline_epochs`). `short` is finetune's recipe, freezing and decay included, at
    max_length min(max_length, LONG_TOKENS) (what reading whole functions buys).
    """
    if name == SHORT_BASELINE:
        return cfg.model_copy(update={"max_length": min(cfg.max_length, LONG_TOKENS)}), cfg.epochs, "finetune.lr"
    if name == "scratch":
        return cfg, cfg.epochs, "finetune.lr"
    lr = cfg.baseline_lr or cfg.lr
    small = cfg.model_copy(update={"lr": lr, "min_lr": cfg.min_lr * lr / cfg.lr})
    return small, cfg.baseline_epochs or cfg.epochs, "finetune.baseline_lr" if cfg.baseline_lr else "finetune.lr"
