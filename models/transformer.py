"""Transformer language model: pre-norm blocks, SDPA attention, weight-tied head.

Decoder-only (causal) by default; `causal=False` gives the bidirectional encoder that masked-LM
pretraining needs. Positions are learned or rotary; `attn_window` turns on sliding-window (local)
attention, the sparse-attention option. A causal model decodes incrementally with a `KVCache`: each
forward then reads only the new tokens and attends over the keys and values cached for the earlier ones
(models/sampling.py drives it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.attention import SparsePattern, attend, dense_mask
from models.losses import linear_cross_entropy
from models.sampling import Sampling, decode


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
    """Sliding-window attention: a token sees the tokens less than this many positions away (a causal one: at most
    this many, itself included); 0 = all. Sequences longer than 2 windows use the blocked kernel of
    models/attention.py (linear cost); shorter ones a dense mask."""
    attn_global: int = 0
    """With a window: the first n positions are global (attend to and are attended by every token); 1 = the first
    token, the attention sink of a causal windowed model."""
    attn_chunked: bool = False
    """With a window: local attention within fixed chunks of attn_window positions instead of a sliding window (with
    tiled learned positions each chunk reads like a pretraining sequence; see models/attention.py)."""
    attn_global_last: bool = False
    """With a window: the last real token of each row is global too (classifiers: the pooling token of
    `pooling: last`); only where the caller passes lengths."""
    causal: bool = True
    """Causal (decoder, next-token) attention; False = bidirectional (masked-LM encoder)."""
    layer_heads: list[int] = field(default_factory=list)
    """Attention heads kept in each block after structured pruning (head size stays n_embd / n_head);
    empty = n_head everywhere."""
    layer_ffn: list[int] = field(default_factory=list)
    """MLP hidden width of each block after structured pruning; empty = 4 * n_embd everywhere."""
    activation: str = "gelu"
    """MLP activation: `gelu` (exact erf form) or `gelu_tanh` (the tanh approximation: GPT-2's `gelu_new`, imported
    Hugging Face checkpoints)."""

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
        if self.attn_window < 0 or self.attn_global < 0:
            raise ValueError("attn_window and attn_global must be >= 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
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
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}
"""MLP activation name -> `F.gelu`'s `approximate` argument."""


def rope_tables(T: int, head_dim: int, base: float, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (T, D/2) for rotary embeddings of positions start..start+T-1, in float32."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    positions = torch.arange(start, start + T, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (even, odd) of `x` (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, H, T, D/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def blocked_export(cfg: GPTConfig) -> bool:
    """Whether a traced (ONNX) trunk runs the blocked kernel: under a window whose multiples tile block_size, with
    the global positions known from the config (no `attn_global_last`). Its input length must then be a multiple of
    attn_window (a traced ceil(T / window) would fix the number of blocks); otherwise the trace uses a dense mask."""
    return bool(cfg.attn_window) and cfg.block_size % cfg.attn_window == 0 and not cfg.attn_global_last


def attention_pattern(
    cfg: GPTConfig, T: int, lengths: torch.Tensor | None, device, start: int = 0, traceable: bool = False
) -> torch.Tensor | SparsePattern | None:
    """How the T queries at positions start.. attend: the blocked kernel's pattern for a long sequence under a
    window, else a dense mask (None: plain causal). `lengths` (B,) are the rows' real lengths, when known.

    `traceable` (ONNX export): no Python branch on T, so one traced graph serves every length: the blocked kernel
    for every T where `blocked_export` says so (its global positions known from the config:
    `SparsePattern.leading_global`), else a dense mask tensor. Both are exact: for T <= attn_window the
    window (or chunk) covers every pair, and `dense_mask` is the same pattern as the blocked kernel."""
    # a window over the whole sequence is no window (and, traced, keeping it changes nothing)
    window = cfg.attn_window if traceable or start + T > cfg.attn_window else 0
    glob = None
    if window and (cfg.attn_global or (cfg.attn_global_last and lengths is not None)):
        positions = torch.arange(start + T, device=device)
        glob = (positions < cfg.attn_global)[None]  # (1, start + T)
        if cfg.attn_global_last and lengths is not None:
            glob = glob | (positions[None] == lengths[:, None] - 1)  # (B, start + T)
    padding = None if cfg.causal else lengths  # causal tokens never see later pads
    if traceable and start == 0 and blocked_export(cfg):
        return SparsePattern(window, cfg.causal, glob, padding, cfg.attn_chunked, leading_global=cfg.attn_global)
    if window and start == 0 and T > 2 * window and not traceable:
        return SparsePattern(window, cfg.causal, glob, padding, cfg.attn_chunked)
    mask = dense_mask(T, cfg.causal, window, glob, padding, device, start, cfg.attn_chunked)
    if traceable and mask is None:  # SDPA's is_causal is chosen by a Python test on T; a mask tensor is not
        keys = torch.arange(start + T, device=device)
        mask = (keys[None, :] <= keys[start:, None])[None, None]  # (1, 1, T, start + T)
    return mask


class LayerCache:
    """Keys and values (B, H, capacity, D) of one attention layer, filled from position 0 up to `length`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values (B, H, T, D) of the next T positions; all keys and values so far."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions, capacity {self.capacity}")
        if self.k is None or self.k.shape != (B, H, self.capacity, D) or self.k.dtype != k.dtype:
            # allocated once per shape: decoding then writes in place instead of concatenating every step
            self.k = k.new_empty(B, H, self.capacity, D)
            self.v = v.new_empty(B, H, self.capacity, D)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, end, D)


class KVCache:
    """Every layer's keys and values for incremental decoding of a causal model (`GPT.new_cache`)."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached so far: the position of the next token."""
        return self.layers[0].length

    def reset(self) -> None:
        """Forget every position (the buffers are kept for the next prefill)."""
        for layer in self.layers:
            layer.length = 0


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

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | SparsePattern | None,
        rope: tuple | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        inner = self.n_head * self.head_dim
        q, k, v = self.qkv(x).split(inner, dim=2)  # (B, T, H*D) each
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, start + T, D): the earlier positions' keys and values too
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, inner)  # (B, T, H*D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 4 * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = SelfAttention(cfg, cfg.heads(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg, cfg.ffn(layer))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | SparsePattern | None = None,
        rope: tuple | None = None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, rope, cache)
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
        self.traceable = False
        """Export mode (models/onnx_export.py sets it on a copy): attention masks come from tensor ops for every
        length (`attention_pattern(traceable=True)`), so `torch.onnx.export` traces one graph with dynamic axes."""
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

    def extend_positions(self, block_size: int, window: int = 0, n_global: int = 0, chunked: bool = False) -> None:
        """Read up to `block_size` tokens from now on, with `window`/`n_global`/`chunked` (when a window is given) as
        `attn_window`, `attn_global` and `attn_chunked`. Learned position embeddings are tiled, Longformer's copy
        initialisation (position p starts as p mod the old block_size); rotary positions need nothing."""
        old = self.config.block_size
        if block_size < old:
            raise ValueError(f"block_size {block_size} is shorter than the model's {old}")
        if self.wpe is not None and block_size > old:
            weight = self.wpe.weight.detach()
            tiled = weight.repeat(-(-block_size // old), 1)[:block_size]
            self.wpe = nn.Embedding.from_pretrained(tiled.clone(), freeze=False)
        self.config.block_size = block_size
        if window:
            self.config.attn_window, self.config.attn_global, self.config.attn_chunked = window, n_global, chunked

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N + 12·L·H·Q·T (PaLM appendix B; nanoGPT `estimate_mfu`)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    def new_cache(self) -> KVCache:
        """An empty key/value cache of block_size positions for `forward(..., cache=)` (causal models only)."""
        if not self.config.causal:
            raise ValueError("a bidirectional (masked-LM) model cannot generate text")
        return KVCache(self.config.n_layer, self.config.block_size)

    def hidden(
        self, idx: torch.Tensor, lengths: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Final-norm hidden states for token ids `idx` (B, T) -> (B, T, C).

        `lengths` (B,) marks right padding: a bidirectional trunk masks the pads, and `attn_global_last` makes
        each row's last real token global (causal tokens never see later pads). With a `cache`, `idx` holds the
        tokens at positions cache.length.. (their keys and values are added to it) and they attend over the cached
        positions too.
        """
        B, T = idx.shape
        c = self.config
        start = cache.length if cache is not None else 0
        if start + T > c.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {c.block_size}")
        if cache is not None and not c.causal:
            raise ValueError("a bidirectional (masked-LM) model cannot generate text")
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        mask = attention_pattern(c, T, lengths, idx.device, start, self.traceable)
        rope = rope_tables(T, c.head_dim, c.rope_base, idx.device, start) if c.pos_encoding == "rope" else None
        layers = cache.layers if cache is not None else [None] * len(self.blocks)
        for block, layer_cache in zip(self.blocks, layers):
            x = block(x, mask, rope, layer_cache)
        return self.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
        fused_loss: bool = False,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) and, given `targets` (B, T), the mean cross-entropy (ignore index -1).

        With `fused_loss` the loss is computed chunk-wise without building the logits, and the
        logits returned are None. A bidirectional (masked-LM) model scores only the positions that
        have a target. With a `cache` (`new_cache`), `idx` continues the cached positions (see `hidden`).
        """
        h = self.hidden(idx, lengths, cache)  # (B, T, C)
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
        top_p: float = 1.0,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """`idx` (B, T) followed by `max_new_tokens` sampled tokens (B, T + max_new_tokens); temperature 0 is
        greedy. The sampler and the rule at block_size are models/sampling.py's `decode`."""
        sampling = Sampling(temperature=temperature, top_k=top_k or 0, top_p=top_p)
        new = list(decode(self, idx, max_new_tokens, sampling, generator, use_cache))  # each (B,)
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx
