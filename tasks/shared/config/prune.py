"""`prune:` — structured pruning of attention heads and MLP channels, then a short recovery fine-tune."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class PruneConfig(Section):
    """Structured pruning of the fine-tuned classifier (variant `pruned`)."""

    enabled: bool = True
    """Build the variant; false leaves a `skipped.json` marker and nothing to evaluate."""
    heads: float = Field(0.5, ge=0, lt=1)
    """Share of attention heads removed from each block (the least important by the Taylor score; one always stays)."""
    ffn: float = Field(0.625, ge=0, lt=1)
    """Share of MLP hidden channels removed from each block."""
    importance_batches: int = Field(0, ge=0)
    """Validation batches (of finetune.batch_size) scored for importance; 0 = the whole validation split."""
    recovery_epochs: int = Field(2, ge=0)
    """Fine-tuning epochs after pruning (finetune's recipe otherwise); the best validation epoch is kept."""
    recovery_lr: float = Field(5e-4, gt=0)
    """Peak learning rate of the recovery fine-tune."""
