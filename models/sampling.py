"""The one sampler: next-token selection and the decoding loop, with a key/value cache by default.

`GPT.generate` (batches of prompts) and the serving core (deploy/core.py: REST /generate and
/generate_stream, gRPC Generate and GenerateStream, the promotion smoke gate) all decode here.

The context at block_size ("context shift", as llama.cpp calls it): a prompt longer than the model's
block_size keeps its last block_size tokens; when the context is full and another token is sampled, the
context becomes the last block_size // 2 tokens (the new one included) and is read again from position 0,
then decoding goes on from there. Cached and uncached decoding follow the same rule, so for the same
model, prompt and generator they read the same contexts at the same positions and pick the same tokens
(up to float rounding of the logits, which differs between a one-token step and a full forward by about
1e-6: it can only matter where two tokens tie). Re-reading half a block every block_size // 2 tokens keeps
the cache's positions valid for learned and rotary positions alike; sliding the context by one token per
step would move every position and leave nothing to cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0
    """Divides the logits; 0 = greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 = no cut."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens whose probability reaches top_p; 1 = all."""

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


GREEDY = Sampling(temperature=0.0)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token id (B,) from `logits` (B, V): greedy at temperature 0, else temperature, then top-k, then
    top-p, drawn with `generator`."""
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.double()  # float64: a tiny temperature gives -inf, never NaN
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    if sampling.top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        beyond = torch.cumsum(sorted_p, dim=-1) - sorted_p >= sampling.top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(beyond, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """The next `max_new_tokens` token ids (B,) of the prompts `idx` (B, T), one step at a time.

    `model` is a causal `models.transformer.GPT`. With `use_cache` each step reads only the new token and
    the model's KVCache holds the rest; without, each step reads the whole context again (the reference the
    cache must agree with). The context at block_size follows the module docstring's rule in both modes.

    Raises:
        ValueError: the model is a masked-LM encoder (it cannot generate).
    """
    cfg = model.config
    if not cfg.causal:
        raise ValueError("a bidirectional (masked-LM) model cannot generate text")
    if max_new_tokens <= 0:
        return
    keep = max(1, cfg.block_size // 2)
    context = idx[:, -cfg.block_size :]  # (B, T)
    cache = model.new_cache() if use_cache else None
    logits = _last_logits(model, context, cache)
    for step in range(max_new_tokens):
        token = next_token(logits, sampling, generator)  # (B,)
        yield token
        if step == max_new_tokens - 1:
            break
        context = torch.cat([context, token[:, None]], dim=1)
        if context.size(1) > cfg.block_size:  # context shift: keep the last half block, read it again
            context = context[:, -keep:]
            if cache is not None:
                cache.reset()
            logits = _last_logits(model, context, cache)
        else:
            logits = _last_logits(model, token[:, None] if cache is not None else context, cache)


def _last_logits(model, idx: torch.Tensor, cache) -> torch.Tensor:
    """Logits (B, V) after the last token of `idx`, over the real vocabulary (not its padding); the LM head reads
    only the last position (a prefill or an uncached step needs no logits for the others)."""
    return model.lm_head(model.hidden(idx, cache=cache)[:, -1])[:, : model.config.vocab_size]
