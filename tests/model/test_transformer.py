"""Behaviour of the tiny GPT and the classifier: shapes, causality, tying, learning, sampling, padding."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPT, GPTConfig, padded_vocab, tiny

VOCAB = 50  # padded to 64 inside the model


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(vocab_size=VOCAB)).eval()


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def test_tiny_preset_shape():
    cfg = tiny(vocab_size=VOCAB)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (2, 2, 16, 32)
    assert padded_vocab(VOCAB) == 64 and padded_vocab(64) == 64 and padded_vocab(65) == 128


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=4)
    with pytest.raises(ValueError, match="unknown model config keys"):
        GPTConfig.from_dict({**tiny().to_dict(), "n_layers": 3})
    assert GPTConfig.from_dict(tiny(vocab_size=7).to_dict()) == tiny(vocab_size=7)


def test_output_shapes(gpt):
    x = _ids(3, 10)
    logits, loss = gpt(x)
    assert logits.shape == (3, 10, padded_vocab(VOCAB)) and loss is None
    logits, loss = gpt(x, x)
    assert loss.shape == () and torch.isfinite(loss)
    assert gpt.hidden(x).shape == (3, 10, 16)


def test_initial_loss_is_near_uniform(gpt):
    x = _ids(4, 32)
    _, loss = gpt(x, x)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(padded_vocab(VOCAB) * 1.0)).item(), rel=0.05)


def test_ignore_index_excludes_targets(gpt):
    x = _ids(2, 8)
    y = x.clone()
    y[:, 4:] = -1
    _, masked = gpt(x, y)
    logits, _ = gpt(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].reshape(-1, logits.size(-1)), x[:, :4].reshape(-1))
    assert_close(masked, expected)


def test_sequence_longer_than_block_is_rejected(gpt):
    with pytest.raises(ValueError, match="block_size"):
        gpt(_ids(1, 33))


def test_causality_future_token_does_not_change_past_logits(gpt):
    x = _ids(2, 20)
    changed = x.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    a, _ = gpt(x)
    b, _ = gpt(changed)
    assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_weight_tying(gpt):
    assert gpt.lm_head.weight is gpt.wte.weight
    n_unique = len({p.data_ptr() for p in gpt.parameters()})
    assert n_unique == len(list(gpt.parameters()))  # parameters() yields the tied tensor once


def test_loss_decreases_on_repeated_batch():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=VOCAB)).train()
    x = _ids(4, 16, seed=1)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_training_is_deterministic_with_a_seed():
    def train() -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(tiny(vocab_size=VOCAB)).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = _ids(2, 16, seed=2)
        for _ in range(5):
            _, loss = model(x, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.detach()

    assert_close(train(), train(), rtol=0, atol=0)


def test_generate_length_and_vocab_range(gpt):
    prompt = _ids(2, 5)
    out = gpt.generate(prompt, max_new_tokens=40, generator=torch.Generator().manual_seed(0))  # crosses block_size
    assert out.shape == (2, 45)
    assert torch.equal(out[:, :5], prompt)
    assert int(out.max()) < VOCAB  # never samples a padding slot of the vocabulary


def test_generate_is_deterministic_with_seeded_generator(gpt):
    prompt = _ids(1, 4)
    a = gpt.generate(prompt, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    b = gpt.generate(prompt, 12, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    c = gpt.generate(prompt, 12, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_one_equals_greedy(gpt):
    prompt = _ids(1, 4)
    greedy = gpt.generate(prompt, 10, temperature=0)
    assert torch.equal(
        gpt.generate(prompt, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3)), greedy
    )


def test_temperature_zero_is_greedy(gpt):
    prompt = _ids(1, 3)
    out = gpt.generate(prompt, 8, temperature=0)
    idx = prompt
    for _ in range(8):
        logits, _ = gpt(idx)
        idx = torch.cat([idx, logits[:, -1, :VOCAB].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, idx)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_classifier_right_padding_does_not_change_logits(pooling):
    torch.manual_seed(0)
    clf = TransformerClassifier(
        ClassifierConfig(trunk=tiny(vocab_size=VOCAB), labels=["a", "b", "c"], pooling=pooling)
    ).eval()
    torch.nn.init.normal_(clf.head.weight, std=1.0)  # make the logits differ visibly between inputs
    pad = 1
    seqs = [_ids(1, n, seed=n)[0] for n in (5, 11, 20)]
    alone = torch.cat([clf(s[None], torch.tensor([len(s)])) for s in seqs])
    T = 32
    batch = torch.full((len(seqs), T), pad)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in seqs])
    padded = clf(batch, lengths)
    assert padded.shape == (3, 3)
    assert_close(padded, alone)
    # and the padding length is what matters: a wrong length changes the answer
    assert not torch.allclose(clf(batch, lengths + 1), alone)


def test_classifier_pooling_modes_differ():
    torch.manual_seed(0)
    trunk = tiny(vocab_size=VOCAB)
    mean = TransformerClassifier(ClassifierConfig(trunk=trunk, labels=["a", "b"], pooling="mean")).eval()
    last = TransformerClassifier(ClassifierConfig(trunk=trunk, labels=["a", "b"], pooling="last")).eval()
    last.load_state_dict(mean.state_dict())
    torch.nn.init.normal_(mean.head.weight, std=1.0)
    last.head.weight.data.copy_(mean.head.weight.data)
    x, n = _ids(2, 10), torch.tensor([10, 6])
    assert not torch.allclose(mean(x, n), last(x, n))


def test_classifier_config_validation():
    with pytest.raises(ValueError, match="pooling"):
        ClassifierConfig(trunk=tiny(), labels=["a", "b"], pooling="max")
    with pytest.raises(ValueError, match="2 labels"):
        ClassifierConfig(trunk=tiny(), labels=["a"])
    cfg = ClassifierConfig(trunk=tiny(vocab_size=9).to_dict(), labels=["a", "b"])
    assert cfg.trunk == tiny(vocab_size=9)


# --- positions, local attention, bidirectional trunk, fused loss ---------------------------------


def _ids64(n=3, T=12, seed=0):
    return torch.randint(64, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_causal_trunks_never_look_ahead(pos):
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, pos_encoding=pos)).eval()
    x = _ids64()
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 64
    torch.testing.assert_close(m.hidden(x)[:, :8], m.hidden(y)[:, :8])


def test_rope_has_no_position_table_and_is_shift_equivariant_in_attention():
    from models.transformer import apply_rope, rope_tables

    m = GPT(tiny(vocab_size=64, pos_encoding="rope"))
    assert m.wpe is None and "wpe.weight" not in m.state_dict()
    cos, sin = rope_tables(10, 8, 10000.0, "cpu")
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = rq[0, 0] @ rk[0, 0].T  # (10, 10): depends only on the offset between positions
    torch.testing.assert_close(scores.diagonal(2)[:-1], scores.diagonal(2)[1:], rtol=1e-4, atol=1e-5)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, attn_window=3, n_layer=1)).eval()
    x = _ids64(T=12)
    y = x.clone()
    y[:, 0] = (y[:, 0] + 1) % 64
    h1, h2 = m.hidden(x), m.hidden(y)
    assert not torch.allclose(h1[:, 2], h2[:, 2])  # token 2 still sees token 0 (window 3, one layer)
    torch.testing.assert_close(h1[:, 3:], h2[:, 3:])  # later tokens do not


def test_bidirectional_trunk_sees_the_future_but_not_the_padding():
    from models.classifier import ClassifierConfig, TransformerClassifier

    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, causal=False)).eval()
    x = _ids64()
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 64
    assert not torch.allclose(m.hidden(x)[:, :5], m.hidden(y)[:, :5])
    clf = TransformerClassifier(ClassifierConfig(trunk=m.config, labels=["a", "b"])).eval()
    lengths = torch.tensor([10, 10, 10])
    torch.testing.assert_close(clf(x, lengths), clf(y, lengths))  # tokens past `lengths` are masked keys


def test_a_masked_lm_cannot_generate():
    with pytest.raises(ValueError, match="cannot generate"):
        GPT(tiny(vocab_size=64, causal=False)).generate(_ids64(1, 4), 2)


def test_masked_lm_loss_counts_only_target_positions():
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=64, causal=False))
    x = _ids64()
    y = torch.full_like(x, -1)
    y[:, 3] = x[:, 3]
    logits, loss = m(x, y)
    assert logits.shape == (3, 64)  # only the 3 target rows are scored
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, x[:, 3]))


@pytest.mark.parametrize("causal", [True, False])
def test_fused_loss_matches_plain_loss_and_gradients(causal):
    torch.manual_seed(0)
    x = _ids64(4, 16)
    y = torch.roll(x, -1, 1)
    if not causal:
        y = torch.where(torch.rand(y.shape) < 0.3, y, torch.full_like(y, -1))
    else:
        y[:, -1] = -1
    grads, losses = [], []
    for fused in (False, True):
        torch.manual_seed(0)
        m = GPT(tiny(vocab_size=64, causal=causal))
        logits, loss = m(x, y, fused_loss=fused)
        assert (logits is None) == fused
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# --- the key/value cache -------------------------------------------------------------------------

CACHE_SHAPES = {
    "learned": {},
    "rope": {"pos_encoding": "rope"},
    "learned-window": {"attn_window": 5},
    "rope-window": {"pos_encoding": "rope", "attn_window": 7},
    "window-global": {"attn_window": 5, "attn_global": 2},
    "pruned": {"layer_heads": [1, 2], "layer_ffn": [8, 40]},
}


@pytest.mark.parametrize("shape", CACHE_SHAPES.values(), ids=CACHE_SHAPES.keys())
def test_cached_logits_equal_a_full_forward(shape):
    """A prefill, a chunk at an offset, then one token at a time: the logits of a forward over the whole prefix."""
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=VOCAB, **shape)).eval()
    x = _ids(2, 32)  # up to block_size
    cache = m.new_cache()
    with torch.inference_mode():
        full = m(x)[0]
        parts = [m(x[:, :9], cache=cache)[0], m(x[:, 9:14], cache=cache)[0]]
        parts += [m(x[:, t : t + 1], cache=cache)[0] for t in range(14, 32)]
    assert cache.length == 32
    assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds block_size"):
        m(x[:, :1], cache=cache)


def test_a_reset_cache_starts_again_at_position_zero(gpt):
    x = _ids(1, 12)
    cache = gpt.new_cache()
    with torch.inference_mode():
        gpt(_ids(1, 20, seed=5), cache=cache)
        cache.reset()
        assert cache.length == 0
        assert_close(gpt(x, cache=cache)[0], gpt(x)[0], rtol=1e-5, atol=1e-5)


def test_a_masked_lm_has_no_cache():
    m = GPT(tiny(vocab_size=64, causal=False))
    with pytest.raises(ValueError, match="cannot generate"):
        m.new_cache()
