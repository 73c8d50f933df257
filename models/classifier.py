"""Sequence classifier: the GPT trunk, a pooling step and a linear head."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from models.transformer import GPT, GPTConfig

POOLINGS = ("mean", "last")


@dataclass
class ClassifierConfig:
    """Trunk shape plus the classification head."""

    trunk: GPTConfig = field(default_factory=GPTConfig)
    """Shape of the pretrained Transformer trunk."""
    labels: list[str] = field(default_factory=list)
    """Class names, in logit order."""
    pooling: str = "mean"
    """How token states become one vector: `mean` over real tokens or the `last` real token."""

    def __post_init__(self) -> None:
        if isinstance(self.trunk, dict):
            self.trunk = GPTConfig.from_dict(self.trunk)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if len(self.labels) < 2:
            raise ValueError("a classifier needs at least 2 labels")

    def to_dict(self) -> dict:
        return asdict(self)


class TransformerClassifier(nn.Module):
    """Transformer trunk + pooling + linear head; right padding is exact (causal trunks never look
    ahead, bidirectional ones mask the padded keys)."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.config = cfg
        self.trunk = GPT(cfg.trunk)
        self.head = nn.Linear(cfg.trunk.n_embd, len(cfg.labels))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) for right-padded token ids `idx` (B, T) with real `lengths` (B,)."""
        h = self.trunk.hidden(idx, lengths)  # (B, T, C)
        if self.config.pooling == "last":
            pooled = h[torch.arange(h.size(0)), lengths - 1]  # (B, C)
        else:
            mask = (torch.arange(h.size(1), device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)  # (B, C)
        return self.head(pooled)  # (B, K)
