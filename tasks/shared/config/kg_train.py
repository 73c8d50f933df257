"""`kg_train:` — the knowledge-graph extractor (tagger, relation classifier, linker) on the pretrained trunk."""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.training import TrainLoop


class KgTrainConfig(TrainLoop):
    """One multitask fine-tune of the extractor's three heads and the trunk; baselines fitted beside it."""

    lr: float = Field(2e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(2e-4, ge=0)
    """Learning rate at the end of the decay."""
    head_lr_scale: float = Field(10.0, gt=0)
    """Learning-rate multiplier of the new parameters (heads, knowledge-base features) over the pretrained trunk's:
    the heads start from scratch and the run is short."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay on matrices."""
    frozen_blocks: int = Field(0, ge=0)
    """Lowest trunk blocks kept as pretrained, with the embeddings (0 = fine-tune the whole trunk): backward stops
    below the first trained block, so each frozen block saves time."""
    epochs: int = Field(3, ge=1)
    """Passes over the training docs; the epoch with the best validation score is kept."""
    batch_size: int = Field(32, ge=1)
    """Docs per step."""
    max_length: int = Field(128, ge=8)
    """Tokens per doc (the rest is cut off; at most the trunk's block size)."""
    max_train_docs: int = Field(0, ge=0)
    """Cap on training docs (seeded sample; 0 = all)."""
    max_val_docs: int = Field(0, ge=0)
    """Cap on validation docs scored after each epoch (seeded sample; 0 = all)."""
    tag_weight: float = Field(1.0, ge=0)
    """Weight of the tagging loss (cross-entropy per token)."""
    relation_weight: float = Field(2.0, ge=0)
    """Weight of the relation loss (cross-entropy per gold pair)."""
    relation_balance: float = Field(0.5, ge=0, le=1)
    """Class weights of the relation loss: count ** -balance (0 = unweighted; most pairs are `none`)."""
    link_weight: float = Field(1.0, ge=0)
    """Weight of the linking loss (cross-entropy over each mention's candidates)."""
    max_link_examples: int = Field(0, ge=0)
    """Cap on linking examples (mentions with >= 2 candidates) trained on (seeded sample; 0 = all)."""
    link_dim: int = Field(64, ge=4)
    """Width of the context and description vectors of the linker."""
    right_context: int = Field(2, ge=0)
    """Tokens after a span whose state represents what follows it (the trunk is causal)."""
    description_length: int = Field(24, ge=4)
    """Tokens of an entity description (id, kind, signature, doc) encoded for linking."""
