"""The blocked sliding-window + global attention against SDPA with the same pattern as a dense mask."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import models.transformer as transformer
from models.attention import SparsePattern, dense_mask, sparse_attention
from models.checkpoint import load_lm, save_lm
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, attention_pattern, tiny

CASES = list(
    itertools.product([True, False], [3, 4], [5, 13, 17], ["none", "first", "first+last", "random"], [0, 1], [0, 1])
)


def _global(kind: str, B: int, T: int, lengths: torch.Tensor) -> torch.Tensor | None:
    positions = torch.arange(T)
    if kind == "none":
        return None
    if kind == "first":
        return (positions < 2)[None]
    if kind == "first+last":
        return (positions < 1)[None] | (positions[None] == lengths[:, None] - 1)
    return torch.rand(B, T, generator=torch.Generator().manual_seed(T)) < 0.2


@pytest.mark.parametrize("causal,window,T,glob,padded,chunked", CASES)
def test_blocked_attention_equals_the_dense_mask_forward_and_backward(causal, window, T, glob, padded, chunked):
    torch.manual_seed(0)
    B, H, D = 3, 2, 8
    q, k, v = (torch.randn(B, H, T, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([T, max(1, T - 4), 1])
    pattern = SparsePattern(window, causal, _global(glob, B, T, lengths), lengths if padded else None, bool(chunked))
    y = sparse_attention(q, k, v, pattern)
    mask = dense_mask(T, causal, window, pattern.global_mask, pattern.lengths, "cpu", chunked=bool(chunked))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad((y * grad).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((ref * grad).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_padded_rows_stay_finite_when_the_window_sees_no_real_key():
    q = k = v = torch.randn(1, 1, 12, 4, requires_grad=True)
    y = sparse_attention(q, k, v, SparsePattern(2, False, None, torch.tensor([2])))
    assert torch.isfinite(y).all()


def test_the_dense_mask_is_the_longformer_pattern():
    T = 6
    m = dense_mask(T, True, 2, (torch.arange(T) < 1)[None], None, "cpu")[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # the global first key, then the window
            [1, 0, 1, 1, 0, 0],
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def _dense_patterns(monkeypatch):
    def dense(cfg, T, lengths, device, start=0, traceable=False):
        pattern = attention_pattern(cfg, T, lengths, device, start, traceable)
        if not isinstance(pattern, SparsePattern):
            return pattern
        glob = pattern.global_mask
        return dense_mask(T, cfg.causal, cfg.attn_window, glob, pattern.lengths, device, start, cfg.attn_chunked)

    monkeypatch.setattr(transformer, "attention_pattern", dense)


@pytest.mark.parametrize(
    "shape",
    [
        {"pos_encoding": "learned", "causal": True, "attn_global": 1},
        {"pos_encoding": "rope", "causal": True, "attn_global": 1, "attn_global_last": True},
        {"pos_encoding": "learned", "causal": False, "attn_global": 2, "attn_global_last": True},
        {"pos_encoding": "rope", "causal": False, "attn_global": 0},
        {"pos_encoding": "learned", "causal": True, "attn_global": 1, "attn_chunked": True},
        {"pos_encoding": "rope", "causal": False, "attn_global": 1, "attn_chunked": True, "attn_global_last": True},
    ],
)
def test_a_long_windowed_trunk_uses_the_blocked_kernel_and_matches_dense(shape, monkeypatch):
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, block_size=40, attn_window=4, **shape)).double()
    idx, lengths = torch.randint(0, 64, (3, 40)), torch.tensor([40, 23, 9])
    assert isinstance(attention_pattern(m.config, 40, lengths, "cpu"), SparsePattern)
    sparse = m.hidden(idx, lengths)
    sparse.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    _dense_patterns(monkeypatch)
    dense = m.hidden(idx, lengths)
    dense.sum().backward()
    rows = torch.arange(40)[None] < lengths[:, None]  # padded rows of a causal trunk are never read
    torch.testing.assert_close(sparse[rows], dense[rows], rtol=0, atol=1e-9)
    for a, p in zip(grads, m.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=1e-9)


def test_the_chunked_mask_sees_only_its_own_chunk_and_the_global_token():
    m = dense_mask(6, True, 3, (torch.arange(6) < 1)[None], None, "cpu", chunked=True)[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],  # a new chunk: the global first key, then its own earlier keys only
            [1, 0, 0, 1, 1, 0],
            [1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_a_short_sequence_takes_the_dense_mask():
    cfg = tiny(attn_window=8, attn_global=1)
    assert not isinstance(attention_pattern(cfg, 16, None, "cpu"), SparsePattern)
    assert isinstance(attention_pattern(cfg, 17, None, "cpu"), SparsePattern)


def test_extended_positions_are_tiled_and_round_trip(tmp_path):
    m = GPT(tiny(vocab_size=64, block_size=8))
    old = m.wpe.weight.detach().clone()
    m.extend_positions(20)
    assert m.config.block_size == 20 and m.wpe.weight.shape[0] == 20
    torch.testing.assert_close(m.wpe.weight[8:16], old)
    torch.testing.assert_close(m.wpe.weight[16:20], old[:4])
    m.config.attn_window, m.config.attn_global = 4, 1
    save_lm(m, tmp_path / "lm")
    back = load_lm(tmp_path / "lm")
    assert back.config == m.config
    idx = torch.randint(0, 64, (2, 20))
    torch.testing.assert_close(back.hidden(idx), m.hidden(idx))
    with pytest.raises(ValueError, match="shorter"):
        m.extend_positions(4)


def test_a_classifier_reads_past_the_pretrained_block_size():
    trunk = tiny(vocab_size=64, block_size=8)
    lm = GPT(trunk)
    lm.extend_positions(64, window=8, n_global=1)
    model = TransformerClassifier(ClassifierConfig(trunk=lm.config, labels=["a", "b"]))
    model.trunk.load_state_dict(lm.state_dict())
    logits = model(torch.randint(0, 64, (2, 64)), torch.tensor([64, 30]))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
