"""Baseline text classifiers trained from scratch beside the pretrained Transformer: a CNN and a GRU.

Both take the same inputs as `TransformerClassifier` (right-padded token ids and real lengths) and
ignore everything past each sequence's length, so extra padding never changes their logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

POOLINGS = ("mean", "last")


def _check_common(vocab_size: int, labels: list[str], dropout: float, sizes: dict[str, int]) -> None:
    if vocab_size < 1:
        raise ValueError("vocab_size must be >= 1")
    if len(labels) < 2:
        raise ValueError("a classifier needs at least 2 labels")
    if not 0.0 <= dropout < 1.0:
        raise ValueError("dropout must be in [0, 1)")
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1")


@dataclass
class CNNConfig:
    """Kim-style CNN: embeddings, parallel convolutions of several widths, max-pool, linear head."""

    vocab_size: int = 4096
    """Number of token ids."""
    labels: list[str] = field(default_factory=list)
    """Class names, in logit order."""
    n_embd: int = 64
    """Token embedding width."""
    channels: int = 64
    """Filters per kernel width."""
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 4, 5])
    """Convolution widths in tokens; each gives `channels` features."""
    dropout: float = 0.1
    """Dropout on the pooled features."""

    def __post_init__(self) -> None:
        self.kernel_sizes = list(self.kernel_sizes)
        _check_common(self.vocab_size, self.labels, self.dropout, {"n_embd": self.n_embd, "channels": self.channels})
        if not self.kernel_sizes or min(self.kernel_sizes) < 1:
            raise ValueError("kernel_sizes must be a non-empty list of widths >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class CNNClassifier(nn.Module):
    """Wide (full) convolutions over the real tokens, ReLU, max over positions, dropout, linear.

    Embeddings past a sequence's length are zeroed and each convolution pads k-1 zeros on both
    sides, so a window sees the same inputs whatever padding follows; only windows that touch a
    real token enter the max-pool.
    """

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.n_embd, cfg.channels, k, padding=k - 1) for k in cfg.kernel_sizes)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.channels * len(cfg.kernel_sizes), len(cfg.labels))
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) for right-padded token ids `idx` (B, T) with real `lengths` (B,)."""
        B, T = idx.shape
        real = torch.arange(T, device=idx.device)[None, :] < lengths[:, None]  # (B, T)
        x = self.embed(idx) * real[..., None].to(self.embed.weight.dtype)  # (B, T, E)
        x = x.transpose(1, 2)  # (B, E, T)
        pooled = []
        for conv, k in zip(self.convs, self.config.kernel_sizes):
            h = F.relu(conv(x))  # (B, C, T + k - 1); output t covers inputs t-k+1 .. t
            keep = torch.arange(h.size(2), device=idx.device)[None, :] < (lengths + k - 1)[:, None]  # (B, T + k - 1)
            h = h.masked_fill(~keep[:, None, :], float("-inf"))
            pooled.append(h.amax(dim=2))  # (B, C)
        return self.head(self.drop(torch.cat(pooled, dim=1)))  # (B, K)


@dataclass
class GRUConfig:
    """Bidirectional GRU over packed sequences, pooled, linear head."""

    vocab_size: int = 4096
    """Number of token ids."""
    labels: list[str] = field(default_factory=list)
    """Class names, in logit order."""
    n_embd: int = 64
    """Token embedding width."""
    hidden: int = 64
    """GRU state width per direction (the pooled vector is twice this)."""
    num_layers: int = 1
    """Stacked GRU layers."""
    pooling: str = "mean"
    """`mean` of the outputs over real tokens, or `last`: the final states of both directions."""
    dropout: float = 0.1
    """Dropout on the embeddings and the pooled vector."""

    def __post_init__(self) -> None:
        sizes = {"n_embd": self.n_embd, "hidden": self.hidden, "num_layers": self.num_layers}
        _check_common(self.vocab_size, self.labels, self.dropout, sizes)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class GRUClassifier(nn.Module):
    """Packed bidirectional GRU: padded positions are never fed to the recurrence."""

    def __init__(self, cfg: GRUConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.n_embd, cfg.hidden, num_layers=cfg.num_layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * cfg.hidden, len(cfg.labels))
        nn.init.normal_(self.embed.weight, std=0.1)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K) for right-padded token ids `idx` (B, T) with real `lengths` (B,)."""
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        x = self.drop(self.embed(idx))  # (B, T, E)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, h_n = self.gru(packed)  # h_n: (layers * 2, B, H), in the caller's batch order
        if self.config.pooling == "last":
            pooled = torch.cat([h_n[-2], h_n[-1]], dim=1)  # (B, 2H): forward end state, backward start state
        else:
            out, _ = pad_packed_sequence(out, batch_first=True)  # (B, max(lengths), 2H), zeros past each length
            pooled = out.sum(1) / lengths.to(out.device, out.dtype)[:, None]  # (B, 2H)
        return self.head(self.drop(pooled))  # (B, K)
