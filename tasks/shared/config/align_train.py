"""`align_train:` — the dual encoder (text and code towers) on the pretrained trunk."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.shared.config.training import TrainLoop


class AlignTrainConfig(TrainLoop):
    """A contrastive fine-tune (symmetric InfoNCE, learnable temperature) of both towers."""

    epochs: int = Field(5, ge=1)
    """Passes over the training pairs; the epoch with the best validation MRR is kept. Measured on the stdlib pairs
    (all, 16/32 tokens): validation MRR 0.243 with 5 (49 s of training on 2 cores at load ~1.5) vs 0.224 with 2."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate of the trunk (the projections and the temperature learn at `head_lr_scale` times it).
    Measured on the stdlib pairs (all, one epoch, 24/48 tokens): validation MRR 0.169 at 1e-3 vs 0.132 at 3e-3."""
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
    pooling: Literal["mean", "last", "mean_lexical"] = "mean"
    """How a tower turns token states into one vector: `mean` over the real tokens, the `last` one (the trunk is
    causal: only the last token has read the whole text), or `mean_lexical`: `mean` beside the mean of the input
    token embeddings (a lexical path: a docstring's words recur in the code's identifiers, what BM25 matches).
    Measured on the stdlib pairs: validation MRR 0.225 vs 0.224 with `mean` (all, 2 epochs, 16/32 tokens: noise), hence
    `mean`."""
    dim: int = Field(128, ge=4)
    """Width of the embeddings (and of the vector index)."""
    max_text_length: int = Field(16, ge=4)
    """Tokens of a docstring read (the rest is cut off; at most the trunk's block size). Measured on the stdlib
    pairs: more steps over all pairs beat longer inputs (16/32 tokens x 2 epochs: validation MRR 0.224; 24/48 x 2:
    0.205; 32/64 on 2,000 pairs x 2: 0.129; 16/32 x 5: 0.243 vs 24/48 x 3: 0.233 in the same time)."""
    max_code_length: int = Field(32, ge=4)
    """Tokens of a function's code read (its signature and first lines)."""
    batch_size: int = Field(64, ge=2)
    """Pairs per step: each pair's code is a negative of every other pair's text and the reverse (in-batch)."""
    module_group: int = Field(1, ge=1)
    """Pairs of one module placed together in a batch (hard in-batch negatives: functions of the same module share
    names and vocabulary); 1 = batches drawn at random. Measured on the stdlib pairs: no gain in validation MRR
    within its noise (0.091 with 4 vs 0.102 with 1), hence 1."""
    hard_negatives: bool = False
    """Give each text an extra negative: the code of another function of its module (one more column of the text ->
    code logits per pair). Measured on the stdlib pairs with `module_group` 4: validation MRR 0.097 vs 0.102 without
    either, for ~25% more tokens per step, hence off."""
    temperature: float = Field(0.07, gt=0.01, le=1.0)
    """Initial softmax temperature (CLIP's 0.07); learned from there, clamped at 0.01."""
    frozen_blocks: int = Field(0, ge=0)
    """Lowest trunk blocks kept as pretrained, with the embeddings (0 = fine-tune the whole trunk): backward stops
    below the first trained block, so each frozen block saves time. Measured on the stdlib pairs: 0 gave validation
    MRR 0.128 vs 0.102 with 2 (the token embeddings learn which code tokens match which words)."""
    max_train_pairs: int = Field(0, ge=0)
    """Cap on training pairs (seeded sample; 0 = all): all ~5,900 stdlib pairs x 5 epochs at 16/32 tokens take ~50 s
    on 2 quiet cores (~25k tokens/s; three times that when other jobs load the cores). A cap shortens the stage."""
    max_val_pairs: int = Field(0, ge=0)
    """Cap on validation pairs (queries and pool) scored after each epoch (seeded sample; 0 = all)."""
