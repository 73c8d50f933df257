"""The one sampler (models/sampling.py): next-token selection, and cached decoding that picks exactly the tokens
of uncached decoding, across the block_size boundary too."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling import GREEDY, Sampling, decode, next_token
from models.transformer import GPT, tiny

VOCAB = 50
SHAPES = {
    "learned": {},
    "rope": {"pos_encoding": "rope"},
    "learned-window": {"attn_window": 5},
    "rope-window": {"pos_encoding": "rope", "attn_window": 7},
    "window-global": {"attn_window": 5, "attn_global": 2},
}


def _model(**shape) -> GPT:
    """A tiny causal model (block_size 32) with weights wide enough that its logits are far from ties."""
    torch.manual_seed(0)
    m = GPT(tiny(vocab_size=VOCAB, **shape)).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def _prompt(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _tokens(m: GPT, prompt: torch.Tensor, n: int, sampling: Sampling, seed: int | None, use_cache: bool):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.stack(list(decode(m, prompt, n, sampling, gen, use_cache=use_cache)), dim=1)  # (B, n)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    "sampling, seed",
    [(GREEDY, None), (Sampling(temperature=0.9, top_k=20, top_p=0.9), 3), (Sampling(temperature=1.3), 4)],
    ids=["greedy", "top-k-top-p", "plain"],
)
def test_cached_and_uncached_decoding_pick_the_same_tokens(shape, sampling, seed):
    """100 new tokens after a 5-token prompt cross block_size (32) several times: every context shift included."""
    m = _model(**shape)
    prompt = _prompt(2, 5)
    cached = _tokens(m, prompt, 100, sampling, seed, use_cache=True)
    assert torch.equal(cached, _tokens(m, prompt, 100, sampling, seed, use_cache=False))
    assert cached.shape == (2, 100) and int(cached.max()) < VOCAB


@pytest.mark.parametrize("prompt_len", [5, 31, 32, 45], ids=["short", "block-1", "block", "longer"])
@pytest.mark.parametrize("shape", [SHAPES["learned"], SHAPES["rope-window"]], ids=["learned", "rope-window"])
def test_the_context_shift_rule(shape, prompt_len):
    """The documented rule, spelt out: a prompt keeps its last block_size tokens; a full context plus a new
    token becomes its last block_size // 2 tokens, read from position 0 again."""
    m = _model(**shape)
    block, keep = m.config.block_size, m.config.block_size // 2
    prompt = _prompt(1, prompt_len)
    context, expected = prompt[:, -block:], []
    with torch.inference_mode():
        for _ in range(70):
            token = m(context)[0][:, -1, :VOCAB].argmax(-1, keepdim=True)
            expected.append(int(token))
            context = torch.cat([context, token], dim=1)
            if context.size(1) > block:
                context = context[:, -keep:]
    for use_cache in (True, False):
        assert _tokens(m, prompt, 70, GREEDY, None, use_cache)[0].tolist() == expected


def test_generate_is_the_sampler_with_the_prompt_in_front():
    m = _model()
    prompt = _prompt(3, 4)
    out = m.generate(prompt, 40, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[:, :4], prompt)
    assert torch.equal(out[:, 4:], _tokens(m, prompt, 40, Sampling(temperature=0.8, top_k=10), 5, use_cache=False))
    assert torch.equal(m.generate(prompt, 0), prompt)


def test_a_masked_lm_refuses_to_decode():
    m = GPT(tiny(vocab_size=VOCAB, causal=False))
    with pytest.raises(ValueError, match="masked-LM"):
        next(decode(m, _prompt(1, 3), 2))


def test_greedy_is_argmax_and_needs_no_generator():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert next_token(logits, GREEDY).tolist() == [1, 0]


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.99]])
    gen = torch.Generator().manual_seed(0)
    assert [int(next_token(logits, Sampling(temperature=6.8e-63), gen)) for _ in range(20)] == [1] * 20


def test_top_k_and_top_p_keep_only_their_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None].repeat(2000, 1)  # 2000 independent draws at once
    gen = torch.Generator().manual_seed(0)
    drawn = lambda s: set(next_token(logits, s, gen).tolist())  # noqa: E731
    assert drawn(Sampling(top_k=2)) == {0, 1}
    assert drawn(Sampling(top_p=0.5)) == {0}  # the first token alone reaches 0.5
    assert drawn(Sampling(top_p=0.6)) == {0, 1}
    assert drawn(Sampling(top_p=0.96)) == {0, 1, 2, 3}
    assert drawn(Sampling(top_k=3, top_p=0.9)) == {0, 1, 2}


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    for t in (0.5, 1.0, 2.0):
        drawn = next_token(logits, Sampling(temperature=t), torch.Generator().manual_seed(1))
        expected = math.exp(2 / t) / sum(math.exp(v / t) for v in (2, 1, 0))  # softmax(logits / t)[0]
        assert float((drawn == 0).float().mean()) == pytest.approx(expected, abs=0.03)


def test_sampling_settings_are_checked():
    for bad in ({"temperature": -1}, {"top_k": -1}, {"top_p": 0}, {"top_p": 1.5}):
        with pytest.raises(ValueError, match="sampling needs"):
            Sampling(**bad)
