"""`pretrain:` — language-model pretraining."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.training import DistributedConfig, ModelSpec, TrainLoop


class PretrainConfig(TrainLoop):
    """Language-model pretraining on the memory-mapped token shards."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Model shape (vocab size comes from the tokenizer)."""
    objective: Literal["causal", "mlm"] = "causal"
    """Next-token prediction (decoder) or BERT-style masked LM (bidirectional encoder)."""
    mask_prob: float = Field(0.15, gt=0, lt=1)
    """MLM: share of tokens selected for prediction (80% masked, 10% random, 10% kept)."""
    batch_size: int = Field(16, ge=1)
    """Global sequences per optimizer step (all processes, all accumulation steps)."""
    micro_batch_size: int = Field(0, ge=0)
    """Sequences per forward pass per process; batch_size / (micro x processes) = accumulation steps.
    0 = no accumulation."""
    max_steps: int = Field(1100, ge=1)
    """Optimizer steps."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Chunked LM-head + cross-entropy that never builds the logits; `auto` = on for CPU."""
    eval_interval: int = Field(250, ge=1)
    """Steps between validation evaluations."""
    eval_batches: int = Field(16, ge=1)
    """Batches per validation evaluation."""
    log_interval: int = Field(10, ge=1)
    """Steps between metric logs."""
    checkpoint_interval: int = Field(250, ge=0)
    """Steps between resumable checkpoints (0 = only at the end)."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` resumes an interrupted run from its last checkpoint when config and data match."""
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process training."""

    @model_validator(mode="after")
    def _check_batch(self) -> "PretrainConfig":
        micro, n = self.micro_batch_size or self.batch_size // self.distributed.world, self.distributed.world
        if micro < 1 or self.batch_size % (micro * n):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x processes ({micro} x {n})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        n = self.distributed.world
        return self.batch_size // ((self.micro_batch_size or self.batch_size // n) * n)
