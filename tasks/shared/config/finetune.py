"""`finetune:` — the classifier on the pretrained trunk and the baselines beside it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.training import TrainLoop


class FinetuneConfig(TrainLoop):
    """Classification head on the pretrained trunk, plus the baselines trained beside it."""

    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(1e-4, ge=0)
    """Learning rate at the end of the decay."""
    warmup_steps: int = Field(20, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.01, ge=0)
    """Decoupled weight decay on matrices."""
    max_length: int = Field(512, ge=8, le=8192)
    """Tokens per example (longer texts are truncated). Past the LM's block size the trunk reads with sparse
    attention (`attn_window`, `attn_global`) and its learned positions are tiled (Longformer's initialisation)."""
    attn_window: int = Field(0, ge=0)
    """Sliding-window span of a trunk that reads past the LM's block size (0 = the LM's block size, the context it
    was pretrained on). Unused at max_length <= block size."""
    attn_chunked: bool = True
    """Such a trunk attends within fixed chunks of `attn_window` tokens (plus the global ones) instead of a sliding
    window: with the tiled positions every chunk reads like a pretraining sequence (measured: steadier than the
    sliding window over seeds, docs/long-context.md)."""
    attn_global: int = Field(1, ge=0)
    """Global tokens of such a trunk: the first n positions attend to and are attended by every token (1 = the
    first token, the causal trunk's attention sink)."""
    pooling: Literal["mean", "last"] = "mean"
    """How token states become one vector."""
    batch_size: int = Field(32, ge=1)
    """Examples per step."""
    epochs: int = Field(4, ge=1)
    """Passes over the (capped) training set."""
    max_train_per_label: int = Field(0, ge=0)
    """Cap on training examples per label (0 = all); keeps classes balanced and CPU runs short."""
    freeze: Literal["none", "embeddings", "trunk"] | int = "none"
    """Frozen part of the pretrained trunk: `none`, `embeddings`, the whole `trunk` (head only), or n = the lowest
    n blocks and the embeddings (0 = none)."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise lr decay d (1 = off): head and final norm get lr, the top block lr·d, the next lr·d², ...,
    the embeddings lr·d^(n_layer+1)."""
    class_weights: Literal["none", "balanced"] = "none"
    """Per-class loss weights: `balanced` = train examples / (classes x examples of the class), as in scikit-learn."""
    patience: int = Field(0, ge=0)
    """Early stopping: stop after this many epochs without a better validation macro-F1 (0 = off)."""
    baselines: list[Literal["scratch", "cnn", "gru", "short"]] = Field(default_factory=lambda: ["short", "cnn"])
    """Trained beside the pretrained model on the same batches: `scratch` (same Transformer and recipe,
    random init), `cnn`, `gru`, `short` (the pretrained model and its recipe on the rows cut to 128 tokens, and
    served at 128: the 128-token model that evaluate's long/short comparison measures reading whole functions
    against)."""
    baseline_epochs: int = Field(0, ge=0)
    """Epochs of the CNN and GRU baselines (0 = `epochs`); `scratch` always uses `epochs`."""
    baseline_lr: float = Field(1e-2, ge=0)
    """Peak learning rate of the CNN and GRU baselines (0 = `lr`); their `min_lr` scales with it."""
    baseline_dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout of the CNN and GRU baselines."""
    cnn_embd: int = Field(64, ge=1)
    """CNN baseline: token embedding width."""
    cnn_channels: int = Field(64, ge=1)
    """CNN baseline: filters per kernel width."""
    cnn_kernel_sizes: list[int] = Field(default_factory=lambda: [3, 4, 5], min_length=1)
    """CNN baseline: convolution widths in tokens."""
    gru_embd: int = Field(64, ge=1)
    """GRU baseline: token embedding width."""
    gru_hidden: int = Field(64, ge=1)
    """GRU baseline: state width per direction (pooled with `pooling`)."""

    @model_validator(mode="after")
    def _check_finetune(self) -> "FinetuneConfig":
        if isinstance(self.freeze, int) and self.freeze < 0:
            raise ValueError(f"freeze must be none, embeddings, trunk or a block count >= 0 (got {self.freeze!r})")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"baselines: each baseline at most once (got {self.baselines})")
        if min(self.cnn_kernel_sizes) < 1:
            raise ValueError("cnn_kernel_sizes: widths must be >= 1")
        return self
