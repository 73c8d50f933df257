"""Sparse attention: a sliding window plus global tokens (Longformer), at a cost linear in the length.

Query i attends to key j when |i - j| < window (and j <= i when causal), or when either position is global:
a global position attends to every key and every query attends to it (Longformer, Beltagy et al. 2020; a causal
model's global first token is the "attention sink" of StreamingLLM, Xiao et al. 2023). Causal masking and
padding (`lengths`: keys at or past a sequence's length are padding) apply to every pair. Every query may
attend to itself, so no row is fully masked and padded rows stay finite.

`dense_mask` writes that pattern as a (T, T) mask for SDPA: the reference, and the cheaper choice for short
sequences. `sparse_attention` computes the same result in blocks of `window` queries, each over its 2 (causal)
or 3 (bidirectional) neighbouring key blocks plus the global keys, and the global queries' rows over every key:
time and memory grow linearly with T and no (T, T) matrix is built. Both are plain torch ops (SDPA underneath), so
they run on CPU and CUDA and autograd gives the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SparsePattern:
    """The blocked kernel's arguments for one forward (every layer shares them)."""

    window: int
    causal: bool
    global_mask: torch.Tensor | None
    """(B or 1, T) bool: global positions."""
    lengths: torch.Tensor | None
    """(B,) real lengths: later keys are padding; None = no padding."""


def dense_mask(
    T: int,
    causal: bool,
    window: int,
    global_mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
    device,
    start: int = 0,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, start + T), True = may attend, of the T queries at positions start..start+T-1
    over the keys at positions 0..start+T-1 (`global_mask` covers all start + T positions); None when SDPA needs
    none (plain causal attention, or one new query that sees every key)."""
    if causal and not window and global_mask is None and lengths is None and (start == 0 or T == 1):
        return None
    keys = torch.arange(start + T, device=device)
    rel = keys[start:, None] - keys[None, :]  # query minus key position, (T, start + T)
    mask = (rel.abs() < window if window else torch.ones_like(rel, dtype=torch.bool))[None]  # (1, T, start + T)
    if global_mask is not None:
        mask = mask | global_mask[:, start:, None] | global_mask[:, None, :]  # (B or 1, T, start + T)
    if causal:
        mask = mask & (rel >= 0)
    if lengths is not None:  # keys past a sequence's length are padding
        mask = mask & (keys[None, None, :] < lengths[:, None, None])
    return (mask | (rel == 0))[:, None]  # every query sees itself


def global_positions(global_mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global positions of each row, (B, G) with G the most any row has, and which of them are real (B, G)
    (a row with fewer is filled with distinct non-global positions)."""
    G = int(global_mask.sum(1).max())
    order = torch.argsort((~global_mask).to(torch.uint8), dim=1, stable=True)[:, :G]  # global positions first
    valid = global_mask.gather(1, order)
    return order.expand(batch, G), valid.expand(batch, G)


def _local_keys(x: torch.Tensor, window: int, causal: bool, blocks: int) -> torch.Tensor:
    """Keys or values (B, H, T, D) -> (B, H, blocks, span, D): for block b the positions (b - 1) * window ..
    (b + 1 or 2) * window - 1, zero outside 0..T-1."""
    T, w = x.size(2), window
    after = (blocks * w - T) + (0 if causal else w)
    span = (2 if causal else 3) * w
    return F.pad(x, (0, 0, w, after)).unfold(2, span, w).transpose(-1, -2)


def _block_masks(
    T: int, pattern: SparsePattern, gidx: torch.Tensor | None, gvalid: torch.Tensor | None, blocks: int, device
) -> torch.Tensor:
    """(B or 1, blocks, w, G + span) bool: which global and local keys each query of each block may attend."""
    w, causal = pattern.window, pattern.causal
    span = (2 if causal else 3) * w
    qpos = torch.arange(blocks * w, device=device).view(blocks, w, 1)  # (nb, w, 1)
    kpos = (torch.arange(blocks, device=device) * w - w).view(blocks, 1, 1) + torch.arange(span, device=device)
    rel = qpos - kpos  # (nb, w, span)
    local = (rel.abs() < w) & (kpos >= 0) & (kpos < T)
    if causal:
        local &= rel >= 0
    local = local[None]  # (1, nb, w, span)
    if pattern.lengths is not None:
        local = local & (kpos[None] < pattern.lengths.view(-1, 1, 1, 1))
    local = local | (rel == 0)[None]  # itself, padded queries included
    if gidx is None:
        return local
    grel = qpos[None] - gidx[:, None, None, :]  # (B, nb, w, G)
    glob = gvalid[:, None, None, :] & (grel.abs() >= w)  # inside the window it is a local key already
    if causal:
        glob &= grel >= 0
    if pattern.lengths is not None:
        glob &= (gidx < pattern.lengths[:, None])[:, None, None, :]
    return torch.cat([glob, local.expand(glob.size(0), -1, -1, -1)], dim=-1)


def _global_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, gidx: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """The global queries' outputs (B, H, G, D): each over every key (causal and padding still apply)."""
    B, H, T, D = q.shape
    qg = q.gather(2, gidx[:, None, :, None].expand(B, H, -1, D))  # (B, H, G, D)
    keys = torch.arange(T, device=q.device)
    mask = torch.ones(B, gidx.size(1), T, dtype=torch.bool, device=q.device)
    if pattern.causal:
        mask &= keys <= gidx[:, :, None]
    if pattern.lengths is not None:
        mask &= keys < pattern.lengths[:, None, None]
    mask |= keys == gidx[:, :, None]
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], dropout_p=dropout_p)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention (B, H, T, D) of q, k, v (B, H, T, D) under `pattern`, in blocks (module docstring)."""
    B, H, T, D = q.shape
    w = pattern.window
    blocks = -(-T // w)
    gidx = gvalid = None
    if pattern.global_mask is not None and bool(pattern.global_mask.any()):
        gidx, gvalid = global_positions(pattern.global_mask, B)
    keys, values = _local_keys(k, w, pattern.causal, blocks), _local_keys(v, w, pattern.causal, blocks)
    if gidx is not None:  # every block also sees the global keys: (B, H, nb, G + span, D)
        index = gidx[:, None, :, None].expand(B, H, -1, D)
        keys = torch.cat([k.gather(2, index)[:, :, None].expand(-1, -1, blocks, -1, -1), keys], dim=3)
        values = torch.cat([v.gather(2, index)[:, :, None].expand(-1, -1, blocks, -1, -1), values], dim=3)
    S = keys.size(3)
    queries = F.pad(q, (0, 0, 0, blocks * w - T)).view(B, H, blocks, w, D).transpose(1, 2)  # (B, nb, H, w, D)
    mask = _block_masks(T, pattern, gidx, gvalid, blocks, q.device)  # (B or 1, nb, w, S)
    y = F.scaled_dot_product_attention(
        queries.reshape(B * blocks, H, w, D),
        keys.transpose(1, 2).reshape(B * blocks, H, S, D),
        values.transpose(1, 2).reshape(B * blocks, H, S, D),
        attn_mask=mask.expand(B, -1, -1, -1).reshape(B * blocks, 1, w, S),
        dropout_p=dropout_p,
    )  # (B * nb, H, w, D)
    y = y.view(B, blocks, H, w, D).transpose(1, 2).reshape(B, H, blocks * w, D)[:, :, :T]
    if gidx is None:
        return y
    yg = _global_rows(q, k, v, pattern, gidx, dropout_p)  # (B, H, G, D)
    order = torch.arange(gidx.size(1), device=q.device).expand_as(gidx)
    slot = torch.zeros(B, T, dtype=torch.long, device=q.device).scatter(1, gidx, order)  # position -> its global row
    is_global = pattern.global_mask.expand(B, T)
    from_global = yg.gather(2, slot[:, None, :, None].expand(B, H, T, D))  # (B, H, T, D)
    return torch.where(is_global[:, None, :, None], from_global, y)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | SparsePattern | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """SDPA with a dense `mask` (None: causal when there are several queries) or the blocked kernel for a
    `SparsePattern`."""
    if isinstance(mask, SparsePattern):
        return sparse_attention(q, k, v, mask, dropout_p)
    # is_causal only for square attention: SDPA aligns its causal mask top-left, which would hide every
    # cached key but the first from a single new query
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1, dropout_p=dropout_p
    )
