"""`align_evaluate:` — retrieval and zero-shot scores of the encoder against lexical baselines."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class AlignEvaluateConfig(Section):
    """Test scores with paired bootstrap intervals over queries (the same queries for every system)."""

    batch_size: int = Field(64, ge=1)
    """Texts (or functions) per forward pass of the encoder."""
    bm25_k1: float = Field(1.5, gt=0)
    """BM25's term-frequency saturation (bm25s's default); the BM25 baseline and the hybrid's lexical side."""
    bm25_b: float = Field(0.75, ge=0, le=1)
    """BM25's length normalisation (bm25s's default)."""
    hybrid_depth: int = Field(100, ge=10)
    """Candidates of each ranking (dense, BM25) that the hybrid fuses, as the service's hybrid search does."""
    probe_c: float = Field(1.0, gt=0)
    """Inverse regularisation strength of the linear probe (logistic regression on frozen code embeddings)."""
    probe_max_iter: int = Field(1000, ge=10)
    """Iterations the probe's solver may take."""
    probe_train_rows: int = Field(2000, ge=0)
    """Labeled train rows the probe learns from (a seeded sample; 0: all): embedding them costs the most time."""
    bootstrap_resamples: int = Field(1000, ge=100, le=100000)
    """Resamples of the test queries behind every 95% interval and comparison."""
    seed: int = 1337
    """Seeds the bootstrap's resamples."""
