"""Typed configuration: one pydantic model per params.yaml section, one loader.

Every field carries its documentation; unknown keys and bad values are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Paths(Section):
    """Every input and output of the pipeline, relative to the project root."""

    user_data: Path
    """Folder for your own corpora and labeled sets (track it with `dvc add`)."""
    raw_corpus: Path
    """Ingested pretraining corpus (parquet: text, source, kind)."""
    raw_labeled: Path
    """Ingested labeled set (parquet: text, label, source, split)."""
    clean_corpus: Path
    """Cleaned pretraining corpus."""
    clean_labeled: Path
    """Cleaned labeled set."""
    expectations: Path
    """Great Expectations suites (JSON), tracked in git."""
    validation: Path
    """Validation results and Data Docs."""
    tokenizer: Path
    """Folder holding the trained BPE `tokenizer.json`."""
    tokens: Path
    """Memory-mapped token-id shards of the corpus (train-*.bin, val-*.bin, meta.json)."""
    checkpoints: Path
    """Resumable training checkpoints (git- and DVC-ignored scratch space)."""
    lm: Path
    """Pretrained language model (safetensors + config.json)."""
    classifier: Path
    """Fine-tuned classifier (safetensors + config.json)."""
    baselines: Path
    """Classifiers trained from scratch beside it, one subfolder per baseline (scratch, cnn, gru)."""
    compressed: Path
    """int8 dynamic-quantized classifier."""
    evaluation: Path
    """Evaluation predictions and plots."""
    metrics: Path
    """Folder of per-stage metrics JSON files (DVC metrics)."""


class TrackingConfig(Section):
    """Where MLflow keeps runs and the model registry (`MLFLOW_TRACKING_URI` overrides `uri`)."""

    uri: str = "sqlite:///mlflow/mlflow.db"
    """MLflow tracking URI; a relative sqlite path is resolved against the project root."""
    artifacts: Path = Path("mlflow/artifacts")
    """Artifact root for new experiments on a local store."""
    experiment: str = "lmforge"
    """MLflow experiment name."""
    registered_model: str = "lmforge-classifier"
    """Name of the registered model that carries the `champion` alias."""


class IngestConfig(Section):
    """Build the raw corpus and labeled set."""

    corpus: str = "stdlib"
    """`stdlib` (built from the installed Python standard library) or a txt/md/jsonl/csv/parquet path."""
    labeled: str = "stdlib"
    """`stdlib` (which package a function comes from) or a jsonl/csv/parquet path with text,label columns."""
    packages: list[str] = Field(default_factory=list)
    """Top-level stdlib packages that become the labels of the default task."""
    min_examples_per_label: int = Field(100, ge=1)
    """A label with fewer examples is an error."""
    max_files: int = Field(0, ge=0)
    """Use at most this many source files per package and for the corpus (0 = all); for tiny runs."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of each label's examples (whole files) in the validation split."""
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of each label's examples (whole files) in the test split."""
    seed: int = 1337
    """Seed of the file-to-split assignment."""

    @model_validator(mode="after")
    def _check(self) -> "IngestConfig":
        if self.labeled == "stdlib" and len(set(self.packages)) < 2:
            raise ValueError("packages: the stdlib task needs at least 2 distinct packages")
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError("val_fraction + test_fraction must leave at least 20% for training")
        return self


class CleanConfig(Section):
    """Normalize, filter and deduplicate text."""

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    """Unicode normalization form."""
    tab_size: int = Field(4, ge=1, le=16)
    """Tabs become this many spaces."""
    min_chars: int = Field(40, ge=1)
    """Drop texts shorter than this after cleaning."""
    max_chars: int = Field(60000, ge=1)
    """Drop corpus texts longer than this."""
    labeled_max_chars: int = Field(6000, ge=1)
    """Drop labeled texts longer than this."""

    @model_validator(mode="after")
    def _check(self) -> "CleanConfig":
        if self.min_chars > min(self.max_chars, self.labeled_max_chars):
            raise ValueError("min_chars must not exceed max_chars or labeled_max_chars")
        return self


class ValidateConfig(Section):
    """Data contract thresholds passed to the Great Expectations suites."""

    min_corpus_rows: int = Field(200, ge=1)
    """The cleaned corpus must have at least this many rows."""
    min_rows_per_label: int = Field(10, ge=1)
    """Every label must have at least this many rows in every split."""


class TokenizeConfig(Section):
    """Train a byte-level BPE tokenizer and write token ids."""

    vocab_size: int = Field(4096, ge=300, le=65535)
    """Target vocabulary size (token ids are stored as uint16)."""
    min_frequency: int = Field(2, ge=1)
    """Minimum pair frequency for a BPE merge."""
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    """Share of corpus documents held out for validation perplexity."""
    seed: int = 1337
    """Seed of the document-to-split assignment."""
    shard_tokens: int = Field(100_000_000, ge=1024)
    """Token ids per memory-mapped shard file."""


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
    """Autocast dtype: `auto` = bf16 on CUDA (fp16 + GradScaler where bf16 is unsupported), fp32 on CPU."""
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
    """Sequences per forward pass per process; batch_size / (micro x processes) = accumulation steps. 0 = no accumulation."""
    max_steps: int = Field(700, ge=1)
    """Optimizer steps."""
    fused_loss: Literal["auto", "on", "off"] = "auto"
    """Chunked LM-head + cross-entropy that never builds the logits; `auto` = on for CPU."""
    eval_interval: int = Field(100, ge=1)
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
        micro, n = self.micro_batch_size or self.batch_size // self.distributed.nproc, self.distributed.nproc
        if micro < 1 or self.batch_size % (micro * n):
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of micro_batch_size x nproc ({micro} x {n})"
            )
        return self

    @property
    def grad_accum(self) -> int:
        n = self.distributed.nproc
        return self.batch_size // ((self.micro_batch_size or self.batch_size // n) * n)


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
    max_length: int = Field(128, ge=8)
    """Tokens per example (longer texts are truncated; at most the trunk's block size)."""
    pooling: Literal["mean", "last"] = "mean"
    """How token states become one vector."""
    batch_size: int = Field(32, ge=1)
    """Examples per step."""
    epochs: int = Field(3, ge=1)
    """Passes over the (capped) training set."""
    max_train_per_label: int = Field(500, ge=0)
    """Cap on training examples per label (0 = all); keeps classes balanced and CPU runs short."""
    freeze: Literal["none", "embeddings", "trunk"] | int = "none"
    """Frozen part of the pretrained trunk: `none`, `embeddings`, the whole `trunk` (head only), or n = the lowest n blocks and the embeddings (0 = none)."""
    layer_lr_decay: float = Field(1.0, gt=0, le=1)
    """Layer-wise lr decay d (1 = off): head and final norm get lr, the top block lr·d, the next lr·d², ..., the embeddings lr·d^(n_layer+1)."""
    class_weights: Literal["none", "balanced"] = "none"
    """Per-class loss weights: `balanced` = train examples / (classes x examples of the class), as in scikit-learn."""
    patience: int = Field(0, ge=0)
    """Early stopping: stop after this many epochs without a better validation macro-F1 (0 = off)."""
    baselines: list[Literal["scratch", "cnn", "gru"]] = Field(default_factory=lambda: ["scratch", "cnn", "gru"])
    """Trained beside the pretrained model on the same batches: `scratch` (same Transformer and recipe, random init), `cnn`, `gru`."""
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


class CompressConfig(Section):
    """int8 dynamic quantization of the fine-tuned classifier."""

    per_channel: bool = True
    """One scale per output channel (more accurate) instead of one per tensor."""


class EvaluateConfig(Section):
    """Test-split evaluation of every variant and baseline."""

    batch_size: int = Field(64, ge=1)
    """Examples per forward pass for accuracy."""
    latency_samples: int = Field(64, ge=1)
    """Single-example requests timed for latency."""
    tfidf_max_features: int = Field(50000, ge=100)
    """Vocabulary cap of the TF-IDF baseline."""
    tfidf_c: float = Field(10.0, gt=0)
    """Inverse regularization strength of the logistic-regression baseline."""


class PromoteConfig(Section):
    """Gates a candidate must pass before the `champion` alias moves to it."""

    variant: Literal["auto", "fp32", "int8"] = "auto"
    """Which variant to register; `auto` takes the best macro-F1 among those within budgets."""
    min_accuracy: float = Field(0.4, ge=0, le=1)
    """Absolute floor on test accuracy."""
    min_macro_f1: float = Field(0.3, ge=0, le=1)
    """Absolute floor on test macro-F1."""
    min_gain_over_majority: float = Field(0.1, ge=0, le=1)
    """Accuracy must beat the majority-class baseline by this much."""
    max_regression: float = Field(0.02, ge=0, le=1)
    """Macro-F1 may be at most this much below the current champion's."""
    max_latency_ms: float = Field(100.0, gt=0)
    """p50 latency budget for one text."""
    max_size_mb: float = Field(100.0, gt=0)
    """Size budget of the model files."""
    require_validation: bool = True
    """Data validation must have passed."""


class Params(Section):
    """The whole params.yaml."""

    paths: Paths
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, stage: str) -> Section:
        """The config of stage `stage` (params.yaml key)."""
        return self.validate_ if stage == "validate" else getattr(self, stage)


STAGE_SECTIONS = ("ingest", "clean", "validate", "tokenize", "pretrain", "finetune", "compress", "evaluate", "promote")


def _describe(err: ValidationError, source: Path) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml; a problem raises UserError naming the file and key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run from the project root or pass --params)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise UserError(_describe(e, path)) from None
