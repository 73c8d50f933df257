"""`align_train:` — the dual encoder (text and code towers) on the pretrained trunk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.training import TrainLoop


class AlignTrainConfig(TrainLoop):
    """A contrastive fine-tune (symmetric InfoNCE, learnable temperature) of both towers."""

    epochs: int = Field(2, ge=1)
    """Passes over the training pairs; the epoch with the best validation MRR is kept."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of the trunk (the projections and the temperature learn at `head_lr_scale` times it)."""
    min_lr: float = Field(1e-4, ge=0)
    """Learning rate at the end of the decay."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay on matrices."""
    head_lr_scale: float = Field(10.0, gt=0)
    """Learning-rate multiplier of the new parameters (projections, logit scale) over the pretrained trunk's."""
    shared_trunk: bool = True
    """One trunk reads both kinds (each kind keeps its own projection); false = a copy of the trunk per kind
    (twice the weights and the backward cost)."""
    pooling: Literal["mean", "last"] = "mean"
    """How a tower turns token states into one vector: `mean` over the real tokens or the `last` one (the trunk is
    causal: only the last token has read the whole text)."""
    dim: int = Field(128, ge=4)
    """Width of the embeddings (and of the vector index)."""
    max_text_length: int = Field(48, ge=4)
    """Tokens of a docstring read (the rest is cut off; at most the trunk's block size)."""
    max_code_length: int = Field(96, ge=4)
    """Tokens of a function's code read (its signature and first lines)."""
    batch_size: int = Field(64, ge=2)
    """Pairs per step: each pair's code is a negative of every other pair's text and the reverse (in-batch)."""
    module_group: int = Field(4, ge=1)
    """Pairs of one module placed together in a batch (hard in-batch negatives: functions of the same module share
    names and vocabulary); 1 = batches drawn at random."""
    hard_negatives: bool = True
    """Give each text an extra negative: the code of another function of its module (one more column of the text ->
    code logits per pair)."""
    temperature: float = Field(0.07, gt=0.01, le=1.0)
    """Initial softmax temperature (CLIP's 0.07); learned from there, clamped at 0.01."""
    frozen_blocks: int = Field(2, ge=0)
    """Lowest trunk blocks kept as pretrained, with the embeddings (0 = fine-tune the whole trunk): backward stops
    below the first trained block, so each frozen block saves time."""
    max_train_pairs: int = Field(4000, ge=0)
    """Cap on training pairs (seeded sample; 0 = all)."""
    max_val_pairs: int = Field(0, ge=0)
    """Cap on validation pairs (queries and pool) scored after each epoch (seeded sample; 0 = all)."""
