"""Transformer language model: pre-norm blocks, SDPA attention, weight-tied head.

Decoder-only (causal) by default; `causal=False` gives the bidirectional encoder that masked-LM
pretraining needs. Positions are learned or rotary; `attn_window` turns on sliding-window (local)
attention, the sparse-attention option.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.losses import linear_cross_entropy


@dataclass
class GPTConfig:
    """Shape of the language model."""

    vocab_size: int = 4096
    """Number of token ids (padded up to a multiple of 64 by `padded_vocab`)."""
    block_size: int = 128
    """Longest sequence the model attends over."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    n_head: int = 4
    """Attention heads per block."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on attention, MLP output and embeddings."""
    bias: bool = False
    """Use bias in Linear and LayerNorm layers."""
    pos_encoding: str = "learned"
    """`learned` absolute position embeddings or `rope` (rotary, applied to queries and keys)."""
    rope_base: float = 10000.0
    """Rotary frequency base."""
    attn_window: int = 0
    """Sliding-window attention: each token sees at most this many tokens (itself included); 0 = all."""
    causal: bool = True
    """Causal (decoder, next-token) attention; False = bidirectional (masked-LM encoder)."""
    layer_heads: list[int] = field(default_factory=list)
    """Attention heads kept in each block after structured pruning (head size stays n_embd / n_head);
    empty = n_head everywhere."""
    layer_ffn: list[int] = field(default_factory=list)
    """MLP hidden width of each block after structured pruning; empty = 4 * n_embd everywhere."""

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(f"pos_encoding must be one of {POS_ENCODINGS}, got {self.pos_encoding!r}")
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size (n_embd / n_head)")
        if self.attn_window < 0:
            raise ValueError("attn_window must be >= 0")
        self.layer_heads, self.layer_ffn = [int(h) for h in self.layer_heads], [int(f) for f in self.layer_ffn]
        for name, sizes, top in (
            ("layer_heads", self.layer_heads, self.n_head),
            ("layer_ffn", self.layer_ffn, 4 * self.n_embd),
        ):
            if sizes and (len(sizes) != self.n_layer or not all(1 <= n <= top for n in sizes)):
                raise ValueError(f"{name} must list n_layer ({self.n_layer}) sizes in [1, {top}], got {sizes}")

    def heads(self, layer: int) -> int:
        """Attention heads of block `layer`."""
        return self.layer_heads[layer] if self.layer_heads else self.n_head

    def ffn(self, layer: int) -> int:
        """MLP hidden width of block `layer`."""
        return self.layer_ffn[layer] if self.layer_ffn else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


def tiny(**kw) -> GPTConfig:
    """For tests: runs in milliseconds."""
    return GPTConfig(**{"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16, **kw})


def small(**kw) -> GPTConfig:
    """The CPU default: trains a few hundred steps in minutes on 2 cores."""
    return GPTConfig(**{"block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 128, **kw})


def gpt2_124m(**kw) -> GPTConfig:
    """GPT-2 small (12 x 768, block 1024) for GPUs."""
    return GPTConfig(**{"vocab_size": 50304, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768, **kw})


PRESETS = {"tiny": tiny, "small": small, "gpt2-124m": gpt2_124m}
POS_ENCODINGS = ("learned", "rope")


def rope_tables(T: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, D/2) for rotary embeddings, in float32."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (even, odd) of `x` (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def attention_mask(T: int, causal: bool, window: int, lengths: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, T), True = may attend; None when plain causal SDPA suffices."""
    if causal and not window and lengths is None:
        return None
    i = torch.arange(T, device=device)
    rel = i[:, None] - i[None, :]  # query minus key position
    mask = torch.ones(T, T, dtype=torch.bool, device=device)
    if causal:
        mask &= rel >= 0
    if window:
        mask &= rel.abs() < window
    mask = mask[None, None]  # (1, 1, T, T)
    if lengths is not None and not causal:  # keys past a sequence's length are padding
        mask = mask & (i[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, T, T)
    return mask


class SelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, n_head: int | None = None) -> None:
        super().__init__()
        self.n_head = n_head or cfg.n_head
        self.head_dim = cfg.head_dim
        inner = self.n_head * self.head_dim  # n_embd unless heads were pruned
        self.rope = cfg.pos_encoding == "rope"
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * inner, bias=cfg.bias)
        self.proj = nn.Linear(inner, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        B, T, C = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(inner, dim=2)  # (B, T, H*D) each
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, inner)  # (B, T, H*D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg, cfg.heads(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, cfg.ffn(layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, rope: tuple | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, rope)
        return x + self.mlp(self.ln_2(x))


def padded_vocab(vocab_size: int) -> int:
    """Round the vocabulary up to a multiple of 64 (faster matmuls)."""
    return (vocab_size + 63) // 64 * 64


class GPT(nn.Module):
    """Transformer trunk with learned or rotary positions and a weight-tied LM head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        vocab = padded_vocab(cfg.vocab_size)
        self.wte = nn.Embedding(vocab, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_encoding == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2 scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM appendix B; nanoGPT `estimate_mfu`)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def hidden(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states for token ids `idx` (B, T) -> (B, T, C).

        `lengths` (B,) marks right padding; only a bidirectional trunk needs it (causal tokens never
        see later pads).
        """
        B, T = idx.shape
        c = self.config
        if T > c.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {c.block_size}")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        x = self.drop(x)
        mask = attention_mask(T, c.causal, c.attn_window, None if c.causal else lengths, idx.device)
        rope = rope_tables(T, c.head_dim, c.rope_base, idx.device) if c.pos_encoding == "rope" else None
        for block in self.blocks:
            x = block(x, mask, rope)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        fused_loss: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) and, given `targets` (B, T), the mean cross-entropy (ignore index -1).

        With `fused_loss` the loss is computed chunk-wise without building the logits, and the
        logits returned are None. A bidirectional (masked-LM) model scores only the positions that
        have a target.
        """
        h = self.hidden(idx, lengths)  # (B, T, C)
        if targets is None:
            return self.lm_head(h), None
        h, t = h.reshape(-1, h.size(-1)), targets.reshape(-1)  # (B*T, C), (B*T,)
        if not self.config.causal:
            keep = t != -1
            h, t = h[keep], t[keep]
        if fused_loss:
            return None, linear_cross_entropy(h, self.lm_head.weight, t)
        logits = self.lm_head(h)  # (N, V)
        loss = F.cross_entropy(logits.float(), t, ignore_index=-1)
        return (logits.view(*idx.shape, -1) if self.config.causal else logits), loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` continuations of `idx` (B, T); temperature 0 is greedy."""
        if not self.config.causal:
            raise ValueError("a bidirectional (masked-LM) model cannot generate text")
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.config.block_size :]
            logits = self(ctx)[0][:, -1, : self.config.vocab_size]  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
