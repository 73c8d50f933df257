"""`clean:` — text normalization, PII scrubbing, filters and deduplication (tasks/shared/cleaning/)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.base import Section

PiiType = Literal["email", "ip", "phone", "secret"]


class CleanConfig(Section):
    """Normalize, scrub, filter and deduplicate text. A ratio filter at 0 (minimum) or 1 (maximum) is off."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    """Unicode normalization form."""
    tab_size: int = Field(4, ge=1, le=16)
    """Tabs become this many spaces."""
    min_chars: int = Field(40, ge=1)
    """Drop texts shorter than this many characters after cleaning."""
    max_chars: int = Field(60000, ge=1)
    """Drop corpus texts longer than this many characters."""
    labeled_max_chars: int = Field(6000, ge=1)
    """Drop labeled texts longer than this many characters."""
    min_tokens: int = Field(3, ge=0)
    """Drop texts with fewer whitespace-separated tokens (the BPE tokenizer is trained after clean); 0 = off."""
    max_tokens: int = Field(0, ge=0)
    """Drop texts with more whitespace-separated tokens; 0 = off."""
    min_alpha_ratio: float = Field(0.25, ge=0, le=1)
    """Drop texts whose letters are less than this share of their non-whitespace characters; 0 = off."""
    max_repeated_line_ratio: float = Field(0.6, ge=0, le=1)
    """Drop texts in which more than this share of non-blank lines repeat an earlier line; 1 = off."""
    max_repeated_char_ratio: float = Field(0.5, ge=0, le=1)
    """Drop texts in which more than this share of characters sit in runs of 10+ identical non-space ones; 1 = off."""
    pii: bool = True
    """Replace personal data and secrets with typed placeholders (<EMAIL>, <IP>, <PHONE>, <SECRET>)."""
    pii_types: list[PiiType] = Field(default_factory=lambda: ["email", "ip", "phone", "secret"])
    """Which kinds of PII to replace (email, ip, phone, secret)."""
    exact_dedup: bool = True
    """Drop texts identical (after cleaning) to an earlier one; the labeled set keeps its training copy."""
    near_dup: bool = True
    """Drop texts whose word shingles are near-identical to an earlier kept text (MinHash-LSH)."""
    near_dup_threshold: float = Field(0.85, gt=0, lt=1)
    """Estimated Jaccard similarity of shingle sets above which two texts are near-duplicates."""
    near_dup_shingle: int = Field(5, ge=1, le=32)
    """Shingle size in lowercased whitespace tokens; a shorter text is one shingle."""
    near_dup_num_perm: int = Field(128, ge=16, le=1024)
    """MinHash signature length: more is more accurate and slower."""
    label_case: Literal["none", "lower", "upper"] = "none"
    """Case folding of labels (before label_aliases)."""
    label_aliases: dict[str, str] = Field(default_factory=dict)
    """Label renames applied after case folding and whitespace cleanup, e.g. {neg: negative}."""
    batch_rows: int = Field(4096, ge=1)
    """Corpus rows read per batch (also capped at ~16 MB of text); the output does not depend on it."""
    workers: int = Field(0, ge=0)
    """Processes that clean the corpus (normalize, PII, filters, digests, MinHash), ~1 MB of text at a time,
    while this one reads, deduplicates and writes: 0 = one per CPU (at most one per MB of text), 1 = all in
    this process. The output does not depend on it."""

    @model_validator(mode="after")
    def _check(self) -> "CleanConfig":
        if self.min_chars > min(self.max_chars, self.labeled_max_chars):
            raise ValueError("min_chars must not exceed max_chars or labeled_max_chars")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        if len(set(self.pii_types)) != len(self.pii_types):
            raise ValueError("pii_types lists a type twice")
        return self
