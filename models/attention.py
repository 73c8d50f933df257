"""Sparse attention: a sliding window plus global tokens (Longformer), at a cost linear in the length.

Query i attends to key j when |i - j| < window (and j <= i when causal), or when either position is global:
a global position attends to every key and every query attends to it (Longformer, Beltagy et al. 2020; a causal
model's global first token is the "attention sink" of StreamingLLM, Xiao et al. 2023). Causal masking and
padding (`lengths`: keys at or past a sequence's length are padding) apply to every pair. Every query may
attend to itself, so no row is fully masked and padded rows stay finite. `chunked` replaces the sliding window by
fixed chunks: i attends to j when both lie in the same chunk of `window` positions (i // window == j // window;
blockwise attention, Qiu et al. 2019): with positions tiled every `window` tokens (`GPT.extend_positions`), every
chunk then reads exactly like a pretraining sequence, and each block of queries needs only its own key block.

`dense_mask` writes that pattern as a (T, T) mask for SDPA: the reference, and the cheaper choice for short
sequences. `sparse_attention` computes the same result in blocks of `window` queries, each over its 2 (causal)
or 3 (bidirectional) neighbouring key blocks (chunked: its own) plus the global keys, and the global queries' rows
over every key: time and memory grow linearly with T and no (T, T) matrix is built. Both are plain torch ops (SDPA
underneath), so they run on CPU and CUDA and autograd gives the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SparsePattern:
    """The blocked kernel's arguments for one forward; every layer shares it, and the masks and global positions
    it derives are built by the first layer and reused by the others (`layout`)."""

    window: int
    causal: bool
    global_mask: torch.Tensor | None
    """(B or 1, T) bool: global positions."""
    lengths: torch.Tensor | None
    """(B,) real lengths: later keys are padding; None = no padding."""
    chunked: bool = False
    """Fixed chunks of `window` positions instead of a sliding window."""
    leading_global: int | None = None
    """Traceable (ONNX export): the global positions are exactly the first `leading_global`, known without reading
    `global_mask`, and nothing branches on T, so one traced graph serves every length."""
    _layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def layout(self, B: int, T: int, device) -> "Layout":
        """The masks and global positions of a (B, T) input, built once (traced: built in the graph)."""
        if self.leading_global is not None:  # a traced T is symbolic: no cache key
            return _layout(self, B, T, device)
        key = (B, T, str(device))
        if key not in self._layouts:
            self._layouts[key] = _layout(self, B, T, device)
        return self._layouts[key]


@dataclass(frozen=True)
class Layout:
    """What the blocked kernel needs besides q, k and v (module docstring)."""

    blocks: int
    block_mask: torch.Tensor
    """(B * blocks or blocks, 1, w, G + span) bool: which global and local keys each query of each block may attend."""
    gidx: torch.Tensor | None
    """(B, G) global positions of each row (distinct; `gvalid` says which are real)."""
    row_mask: torch.Tensor | None
    """(B, 1, G, T) bool: the keys each global query attends."""
    slot: torch.Tensor | None
    """(B, T) the global row of each position (read where the position is global)."""
    is_global: torch.Tensor | None
    """(B, T) bool."""


def dense_mask(
    T: int,
    causal: bool,
    window: int,
    global_mask: torch.Tensor | None,
    lengths: torch.Tensor | None,
    device,
    start: int = 0,
    chunked: bool = False,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, start + T), True = may attend, of the T queries at positions start..start+T-1
    over the keys at positions 0..start+T-1 (`global_mask` covers all start + T positions); None when SDPA needs
    none (plain causal attention, or one new query that sees every key)."""
    if causal and not window and global_mask is None and lengths is None and (start == 0 or T == 1):
        return None
    keys = torch.arange(start + T, device=device)
    rel = keys[start:, None] - keys[None, :]  # query minus key position, (T, start + T)
    mask = _local(keys[start:, None], keys[None, :], window, chunked)[None]  # (1, T, start + T)
    if global_mask is not None:
        mask = mask | global_mask[:, start:, None] | global_mask[:, None, :]  # (B or 1, T, start + T)
    if causal:
        mask = mask & (rel >= 0)
    if lengths is not None:  # keys past a sequence's length are padding
        mask = mask & (keys[None, None, :] < lengths[:, None, None])
    return (mask | (rel == 0))[:, None]  # every query sees itself


def _local(qpos: torch.Tensor, kpos: torch.Tensor, window: int, chunked: bool) -> torch.Tensor:
    """Whether key positions are in the window (or chunk) of query positions (broadcast); all when window is 0."""
    if not window:
        return torch.ones(torch.broadcast_shapes(qpos.shape, kpos.shape), dtype=torch.bool, device=qpos.device)
    return qpos // window == kpos // window if chunked else (qpos - kpos).abs() < window


def _key_blocks(causal: bool, chunked: bool) -> list[int]:
    """Which key blocks (relative to the query block) can hold a local key."""
    return [0] if chunked else [-1, 0] if causal else [-1, 0, 1]


def global_positions(global_mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global positions of each row, (B, G) with G the most any row has, and which of them are real (B, G)
    (a row with fewer is filled with distinct non-global positions)."""
    G = int(global_mask.sum(1).max())
    order = torch.argsort((~global_mask).to(torch.uint8), dim=1, stable=True)[:, :G]  # global positions first
    valid = global_mask.gather(1, order)
    return order.expand(batch, G), valid.expand(batch, G)


def _local_keys(x: torch.Tensor, window: int, offsets: list[int], blocks: int) -> list[torch.Tensor]:
    """Keys or values (B, H, T, D) -> one view (B, H, blocks, w, D) per offset: for block b the positions of
    block b + offset, zero outside 0..T-1 (slices of one padded copy: cheaper than unfold's gradient)."""
    B, H, T, D = x.shape
    w = window
    before, after = -min(offsets) * w, (blocks + max(offsets)) * w - T
    padded = F.pad(x, (0, 0, before, after))
    return [padded[:, :, before + o * w : before + (o + blocks) * w].view(B, H, blocks, w, D) for o in offsets]


def _block_masks(
    T: int, pattern: SparsePattern, gidx: torch.Tensor | None, gvalid: torch.Tensor | None, blocks: int, device
) -> torch.Tensor:
    """(B or 1, blocks, w, G + span) bool: which global and local keys each query of each block may attend."""
    w, causal = pattern.window, pattern.causal
    offsets = _key_blocks(causal, pattern.chunked)
    span = len(offsets) * w
    qpos = torch.arange(blocks * w, device=device).view(blocks, w, 1)  # (nb, w, 1)
    first = (torch.arange(blocks, device=device) + offsets[0]) * w
    kpos = first.view(blocks, 1, 1) + torch.arange(span, device=device)  # (nb, 1, span)
    rel = qpos - kpos  # (nb, w, span)
    local = _local(qpos, kpos, w, pattern.chunked) & (kpos >= 0) & (kpos < T)
    if causal:
        local &= rel >= 0
    local = local[None]  # (1, nb, w, span)
    if pattern.lengths is not None:
        local = local & (kpos[None] < pattern.lengths.view(-1, 1, 1, 1))
    local = local | (rel == 0)[None]  # itself, padded queries included
    if gidx is None:
        return local
    gpos = gidx[:, None, None, :]  # (B, 1, 1, G)
    glob = gvalid[:, None, None, :] & ~_local(qpos[None], gpos, w, pattern.chunked)  # a local key already otherwise
    if causal:
        glob &= qpos[None] >= gpos
    if pattern.lengths is not None:
        glob &= (gidx < pattern.lengths[:, None])[:, None, None, :]
    return torch.cat([glob, local.expand(glob.size(0), -1, -1, -1)], dim=-1)


def _row_mask(pattern: SparsePattern, gidx: torch.Tensor, T: int, device) -> torch.Tensor:
    """(B, 1, G, T) bool: each global query attends every key (causal and padding still apply)."""
    keys = torch.arange(T, device=device)
    mask = torch.ones(gidx.size(0), gidx.size(1), T, dtype=torch.bool, device=device)
    if pattern.causal:
        mask &= keys <= gidx[:, :, None]
    if pattern.lengths is not None:
        mask &= keys < pattern.lengths[:, None, None]
    return (mask | (keys == gidx[:, :, None]))[:, None]


def leading_positions(n_global: int, T: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`global_positions` when the global positions are the first `n_global`, from tensor ops only (traceable);
    past T the position T - 1 repeats, marked not real (its row duplicates T - 1's, so either copy is right)."""
    order = torch.arange(n_global, device=device)
    return order.clamp(max=T - 1).expand(batch, n_global), (order < T).expand(batch, n_global)


def _layout(pattern: SparsePattern, B: int, T: int, device) -> Layout:
    w = pattern.window
    blocks = -(-T // w)
    gidx = gvalid = row_mask = slot = is_global = None
    if pattern.leading_global is not None:
        has_global = pattern.global_mask is not None and pattern.leading_global > 0
    else:
        has_global = pattern.global_mask is not None and bool(pattern.global_mask.any())
    if has_global:
        if pattern.leading_global is not None:
            gidx, gvalid = leading_positions(pattern.leading_global, T, B, device)
        else:
            gidx, gvalid = global_positions(pattern.global_mask, B)
        row_mask = _row_mask(pattern, gidx, T, device)
        order = torch.arange(gidx.size(1), device=device).expand_as(gidx)
        slot = torch.zeros(B, T, dtype=torch.long, device=device).scatter(1, gidx, order)
        is_global = pattern.global_mask.expand(B, T)
    mask = _block_masks(T, pattern, gidx, gvalid, blocks, device)  # (B or 1, nb, w, S)
    mask = mask.expand(B, -1, -1, -1).reshape(B * blocks, 1, w, mask.size(-1))  # (B * nb, 1, w, S)
    return Layout(blocks, mask, gidx, row_mask, slot, is_global)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SparsePattern, dropout_p: float = 0.0
) -> torch.Tensor:
    """Attention (B, H, T, D) of q, k, v (B, H, T, D) under `pattern`, in blocks (module docstring)."""
    B, H, T, D = q.shape
    w = pattern.window
    lay = pattern.layout(B, T, q.device)
    nb = lay.blocks
    offsets = _key_blocks(pattern.causal, pattern.chunked)
    keys, values = _local_keys(k, w, offsets, nb), _local_keys(v, w, offsets, nb)
    if lay.gidx is not None:  # every block also sees the global keys, first
        index = lay.gidx[:, None, :, None].expand(B, H, -1, D)
        keys.insert(0, k.gather(2, index)[:, :, None].expand(-1, -1, nb, -1, -1))
        values.insert(0, v.gather(2, index)[:, :, None].expand(-1, -1, nb, -1, -1))
    keys, values = torch.cat(keys, dim=3), torch.cat(values, dim=3)  # (B, H, nb, G + span, D)
    S = keys.size(3)
    queries = F.pad(q, (0, 0, 0, nb * w - T)).view(B, H, nb, w, D).transpose(1, 2)  # (B, nb, H, w, D)
    y = F.scaled_dot_product_attention(
        queries.reshape(B * nb, H, w, D),
        keys.transpose(1, 2).reshape(B * nb, H, S, D),
        values.transpose(1, 2).reshape(B * nb, H, S, D),
        attn_mask=lay.block_mask,
        dropout_p=dropout_p,
    )  # (B * nb, H, w, D)
    y = y.view(B, nb, H, w, D).transpose(1, 2).reshape(B, H, nb * w, D)[:, :, :T]
    if lay.gidx is None:
        return y
    qg = q.gather(2, lay.gidx[:, None, :, None].expand(B, H, -1, D))  # (B, H, G, D)
    yg = F.scaled_dot_product_attention(qg, k, v, attn_mask=lay.row_mask, dropout_p=dropout_p)  # (B, H, G, D)
    from_global = yg.gather(2, lay.slot[:, None, :, None].expand(B, H, T, D))  # (B, H, T, D)
    return torch.where(lay.is_global[:, None, :, None], from_global, y)


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
