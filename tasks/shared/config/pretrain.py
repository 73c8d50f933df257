"""`pretrain:` — language-model pretraining."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.training import DistributedConfig, ModelSpec, TrainLoop


class PretrainConfig(TrainLoop):
    """Language-model pretraining on the memory-mapped token shards."""

    init_from: str = ""
    """A local Hugging Face GPT-2 family folder (config.json, model.safetensors, tokenizer.json; absolute, or relative
    to the project root) to start from; "" = a new model. Set, the tokenize stage uses its tokenizer (with `<pad>` and
    `<mask>` added) instead of training one, the model's shape comes from the checkpoint (`model` is ignored), the
    objective must be causal, and `max_steps: 0` writes the imported LM unchanged for finetune. DVC tracks this path,
    not the folder's content."""
    model: ModelSpec = Field(default_factory=ModelSpec)
    """Model shape (vocab size comes from the tokenizer); ignored with `init_from`."""
    objective: Literal["causal", "mlm"] = "causal"
    """Next-token prediction (decoder) or BERT-style masked LM (bidirectional encoder)."""
    mask_prob: float = Field(0.15, gt=0, lt=1)
    """MLM: share of tokens selected for prediction (80% masked, 10% random, 10% kept)."""
    batch_size: int = Field(16, ge=1)
    """Global sequences per optimizer step (all processes, all accumulation steps)."""
    micro_batch_size: int = Field(0, ge=0)
    """Sequences per forward pass per process; batch_size / (micro x processes) = accumulation steps.
    0 = no accumulation."""
    max_steps: int = Field(1100, ge=0)
    """Optimizer steps; 0 (only with `init_from`) = none: the imported LM as is."""
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
    def _check_init_from(self) -> "PretrainConfig":
        if self.max_steps == 0 and not self.init_from:
            raise ValueError("max_steps 0 needs init_from (a checkpoint to take the LM from)")
        if self.init_from and self.objective != "causal":
            raise ValueError("init_from: a GPT-2 checkpoint is causal; objective must be causal")
        return self

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
