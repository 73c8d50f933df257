"""`sparsify:` — global unstructured magnitude pruning (sparse weights, same dense shapes)."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class SparsifyConfig(Section):
    """Unstructured magnitude pruning of the fine-tuned classifier (variant `sparse`)."""

    enabled: bool = False
    """Build the variant; false leaves a `skipped.json` marker and nothing to evaluate."""
    sparsity: float = Field(0.5, ge=0, lt=1)
    """Share of classification-Linear weights set to zero, smallest magnitude first, over all layers at once."""
    recovery_epochs: int = Field(1, ge=0)
    """Fine-tuning epochs with the zeros held fixed (pruning masks), before the masks are made permanent."""
    recovery_lr: float = Field(5e-4, gt=0)
    """Peak learning rate of the recovery fine-tune."""
