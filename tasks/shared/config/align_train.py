"""`align_train:` — the dual encoder (text and code towers) on the pretrained trunk."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.training import TrainLoop


class AlignTrainConfig(TrainLoop):
    """A contrastive fine-tune (symmetric InfoNCE, learnable temperature) of both towers."""

    epochs: int = Field(2, ge=1)
    """Passes over the training pairs; the epoch with the best validation MRR is kept."""
