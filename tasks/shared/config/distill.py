"""`distill:` — knowledge distillation of the fine-tuned classifier into a smaller student."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class DistillConfig(Section):
    """A shallower (optionally narrower) student trained on the teacher's soft labels (variant `distilled`)."""

    enabled: bool = True
    """Build the variant; false leaves a `skipped.json` marker and nothing to evaluate."""
    n_layer: int = Field(1, ge=1)
    """Student blocks; they start as copies of evenly spaced teacher blocks (the top one included)."""
    n_embd: int = Field(0, ge=0)
    """Student width; 0 = the teacher's (only then are teacher weights copied)."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature of the KL term (both teacher and student logits are divided by it)."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the KL-to-teacher term; 1 - alpha weighs cross-entropy on the true labels."""
    epochs: int = Field(5, ge=1)
    """Training epochs (finetune's recipe otherwise); the best validation epoch is kept."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
