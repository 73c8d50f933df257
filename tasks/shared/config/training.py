"""What both training sections share: model shape, optimizer, schedule, numerics, processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.base import Section


class ModelSpec(Section):
    """A preset from models/transformer.py, optionally overridden field by field."""

    preset: Literal["tiny", "small", "gpt2-124m"] = "small"
    """Named size preset."""
    n_layer: int | None = Field(None, ge=1)
    """Override: number of blocks."""
    n_head: int | None = Field(None, ge=1)
    """Override: attention heads."""
    n_embd: int | None = Field(None, ge=1)
    """Override: residual width."""
    block_size: int | None = Field(None, ge=8)
    """Override: context length."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Override: dropout."""
    pos_encoding: Literal["learned", "rope"] | None = None
    """Override: `learned` absolute positions or `rope` rotary embeddings."""
    attn_window: int | None = Field(None, ge=0)
    """Override: sliding-window (local) attention span in tokens; 0 = full attention."""

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class TrainLoop(Section):
    """Optimizer, schedule and numerics shared by the training stages."""

    optimizer: Literal["adamw", "sgd", "rmsprop"] = "adamw"
    """AdamW (fused on CUDA), SGD with momentum, or RMSprop."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-4, ge=0)
    """Learning rate at the end of the decay."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to `min_lr`, or constant at `lr`."""
    warmup_steps: int = Field(50, ge=0)
    """Linear warmup steps."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay on matrices (not on norms, biases)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """SGD / RMSprop momentum."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 = off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; `auto` takes CUDA when present."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast dtype: `auto` = bf16 on CUDA (fp16 + GradScaler where bf16 is unsupported); on a CPU with native bf16,
    bf16 where timing the model itself finds it >= 1.1x faster (engine.runtime.probe_cpu_precision), else fp32."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    deterministic: bool = False
    """Deterministic algorithms only (bit-exact reruns on CPU; slower on GPU)."""
    seed: int = 1337
    """Random seed."""

    @model_validator(mode="after")
    def _check_lr(self):
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class DistributedConfig(Section):
    """Data-parallel training across processes, started with torchrun by the stage itself."""

    nproc: int = Field(1, ge=1)
    """Processes on this machine (one per GPU, or CPU processes on gloo); 1 = no torchrun."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """DDP replicates the model; FSDP shards parameters, gradients and optimizer state."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Collective backend: `auto` = nccl on CUDA, gloo on CPU."""
    nnodes: int = Field(1, ge=1)
    """Machines in the job; >1 starts torchrun with a c10d rendezvous at `rdzv_endpoint`
    (run the stage on every node)."""
    rdzv_endpoint: str = ""
    """`host:port` every node can reach (node 0's address) when `nnodes` > 1."""
    rdzv_id: str = "lmforge"
    """Job id the nodes share at the rendezvous; change it between jobs on one endpoint."""

    @model_validator(mode="after")
    def _check_nodes(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of node 0)")
        return self

    @property
    def world(self) -> int:
        """Processes in the whole job: nproc on each of nnodes machines."""
        return self.nproc * self.nnodes

    @property
    def launched(self) -> bool:
        """Whether the stage restarts itself under torchrun."""
        return self.nproc > 1 or self.nnodes > 1

    def torchrun_args(self) -> list[str]:
        """torchrun's options for this job: one machine (`--standalone`) or a c10d rendezvous across `nnodes`."""
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc}"]
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--rdzv-id={self.rdzv_id}",
        ]
