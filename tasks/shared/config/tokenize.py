"""`tokenize:` — the BPE tokenizer and the token shards."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class TokenizeConfig(Section):
    """Train a byte-level BPE tokenizer and write token ids."""

    vocab_size: int = Field(4096, ge=300, le=65535)
    """Target vocabulary size (token ids are stored as uint16)."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair frequency for a BPE merge."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of corpus documents held out for validation perplexity."""
    seed: int = 1337
    """Seed of the document-to-split assignment."""
    shard_tokens: int = Field(100_000_000, ge=1024)
    """Token ids per memory-mapped shard file."""
