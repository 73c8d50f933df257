"""Training and scoring of text classifiers, shared by the stages that train one (finetune, prune, sparsify,
distill).

`fit` trains any classifier (right-padded ids + lengths -> logits) through the engine's one training step
(device, autocast, optimizer, schedule, clipping) and keeps the epoch with the best validation macro-F1;
`loss_fn` replaces plain cross-entropy (distillation). It trains in the precision the probe picks for the
model (`precision: auto` on CPU) but scores validation in the caller's runtime, the configured precision,
so a stage's before and after scores (`val_scores`) are computed alike. `load_examples` encodes the
labeled splits the same way for all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.tokenizer import PAD, encode_texts, load_tokenizer
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.optim import build_optimizer, lr_at, set_lr
from tasks.shared.engine.runtime import Runtime, probe_cpu_precision, unwrap, wrap_model
from tasks.shared.engine.step import Throughput, check_finite, train_step
from tasks.shared.errors import UserError
from tasks.shared.io import read_parquet
from tasks.shared.tracking import Tracker

LOG_EVERY = 10
"""Steps between train-loss logs to the tracker."""


def cap_per_label(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most `cap` rows per label (seeded sample); 0 keeps everything."""
    if not cap:
        return df
    return df.sample(frac=1.0, random_state=seed).groupby("label").head(cap).sort_index()


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def balanced_class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """scikit-learn's `balanced` weights: n_examples / (n_classes x examples of the class)."""
    counts = torch.bincount(y, minlength=n_classes).float()
    return len(y) / (n_classes * counts.clamp(min=1))


@dataclass
class EarlyStopping:
    """Tracks the best validation score; `stop` once `patience` epochs in a row did not beat it (0 = never)."""

    patience: int
    best: float = -math.inf
    best_epoch: int = 0
    waited: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record an epoch's score; True when it is a new best."""
        if score > self.best:
            self.best, self.best_epoch, self.waited = score, epoch, 0
            return True
        self.waited += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.waited >= self.patience


@dataclass
class Examples:
    """Right-padded token ids (N, T), real lengths (N,) and class indices (N,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, rows: torch.Tensor | np.ndarray) -> "Examples":
        """The examples at positions `rows`, in that order."""
        rows = torch.as_tensor(np.array(rows, dtype=np.int64))  # a copy: pandas hands out read-only arrays
        return Examples(self.ids[rows], self.lengths[rows], self.y[rows])

    def cut(self, max_length: int) -> "Examples":
        """Every row cut to its first `max_length` tokens (ids and lengths), as if encoded at `max_length`."""
        return Examples(self.ids[:, :max_length], self.lengths.clamp(max=max_length), self.y)


BUCKET_BATCHES = 16
"""Batches drawn together and sorted by length (see `bucketed_batches`)."""


def bucketed_batches(lengths: torch.Tensor, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch of row indices in batches of similar lengths: rows are shuffled, each run of
    BUCKET_BATCHES x batch_size rows is sorted by length and cut into batches, and the batches are
    shuffled. A batch is padded to its longest row, so this trains on far fewer pad tokens than
    random batches while every batch stays a random draw of the epoch."""
    order = torch.randperm(len(lengths), generator=gen)
    span = batch_size * BUCKET_BATCHES
    batches = []
    for i in range(0, len(order), span):
        chunk = order[i : i + span]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches += list(chunk.split(batch_size))
    return [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]


@torch.no_grad()
def predict(model: nn.Module, data: Examples, rt: Runtime, batch_size: int = 128) -> np.ndarray:
    """Predicted class indices (N,)."""
    model.eval()
    order = torch.argsort(data.lengths, stable=True)  # similar lengths together: little padding
    preds = []
    for i in range(0, len(data), batch_size):
        rows = order[i : i + batch_size]
        n = data.lengths[rows]
        x = data.ids[rows, : int(n.max())].to(rt.device)
        with rt.autocast():
            preds.append(model(x, n.to(rt.device)).argmax(-1).cpu())
    model.train()
    out = torch.empty(len(data), dtype=torch.long)
    out[order] = torch.cat(preds) if preds else out[:0]
    return out.numpy()


@dataclass
class Trained:
    """A model at its best epoch (on CPU, eval mode) and how it got there."""

    model: nn.Module
    history: list[dict]
    best_epoch: int
    epochs_run: int
    val_accuracy: float
    val_macro_f1: float
    train_seconds: float
    params: int
    precision: str = "fp32"
    """What it trained in (`precision: auto` on CPU: timed for this model, see `probe_cpu_precision`); its
    validation scores are in the caller's precision."""

    def summary(self) -> dict:
        keys = ("best_epoch", "epochs_run", "val_accuracy", "val_macro_f1", "train_seconds", "params", "precision")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items() if k in keys}


@dataclass
class _Steps:
    """One model's optimizer steps inside `fit`: the schedule, the engine's step, the divergence check, logging."""

    model: nn.Module
    opt: torch.optim.Optimizer
    rt: Runtime
    """The runtime the model trains in (its probed precision)."""
    loss_of: Callable[[torch.Tensor], torch.Tensor]
    cfg: FinetuneConfig
    total: int
    """Steps of the whole schedule."""
    lengths: torch.Tensor
    """Token count of every training row (throughput)."""
    tracker: Tracker
    prefix: str
    run_name: str
    lr_key: str
    step: int = 0
    tps: float | None = None
    """The last logged tokens/s."""
    meter: Throughput = field(init=False)

    def __post_init__(self) -> None:
        self.meter = Throughput(self.rt.device)

    def __call__(self, rows: torch.Tensor) -> float:
        """One optimizer step on the training rows `rows`; returns its loss."""
        lr = lr_at(self.step, self.total, self.cfg)
        set_lr(self.opt, lr)
        clip = self.cfg.grad_clip
        loss, grad_norm = train_step(self.model, self.opt, self.rt, [rows], self.loss_of, clip)
        loss_value = loss.item()  # on the host every step: a diverged run stops at once
        check_finite(
            self.run_name, self.step, lr, self.rt, clip, loss=loss_value, grad_norm=grad_norm, lr_key=self.lr_key
        )
        self.meter.step(int(self.lengths[rows].sum()))
        if self.step % LOG_EVERY == 0:
            rec = {"train_loss": loss_value, "lr": lr, "grad_norm": grad_norm}
            if (rate := self.meter.window_rate()) is not None:
                rec["tokens_per_s"] = self.tps = rate
            self.tracker.log_metrics({f"{self.prefix}{k}": v for k, v in rec.items()}, step=self.step)
        self.step += 1
        return loss_value


def fit(
    name: str,
    model: nn.Module,
    cfg: FinetuneConfig,
    train: Examples,
    val: Examples,
    n_classes: int,
    rt: Runtime,
    tracker: Tracker,
    epochs: int,
    lr_scale: dict[str, float] | None = None,
    prefix: str = "",
    lr_key: str = "finetune.lr",
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Trained:
    """Train `model` for up to `epochs` on `train`, keep the epoch with the best macro-F1 on `val`.

    Metrics go to `tracker` as `<prefix><metric>`; every model sees the same batch order. `loss_fn(logits,
    y, rows)` (rows: the batch's indices into `train`) replaces cross-entropy, e.g. for distillation. A nan or
    inf loss stops the stage with a UserError naming the step and `lr_key` (the params.yaml key of the lr).
    Training runs in the precision `precision: auto` resolves to for this model; validation is scored in `rt`
    as given (the configured precision), like `val_scores`, and `rt` itself is left as it was.
    """
    from tqdm import tqdm

    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    probe = probe_cpu_precision(rt, cfg.precision, model, lambda: _probe_loss(model, train, cfg.batch_size, rt), name)
    if probe.fp32_s is not None:
        tracker.log_params({f"{prefix}precision": probe.chosen, f"{prefix}precision_probe": probe.reason})
    train_rt = rt.with_precision(probe.chosen)  # this model's training only, with a loss scale of its own
    model = wrap_model(model, train_rt, "ddp", cfg.compile)
    opt = build_optimizer(unwrap(model), cfg, rt.device, lr_scale)  # names without compile's prefix
    weight = balanced_class_weights(train.y, n_classes).to(rt.device) if cfg.class_weights == "balanced" else None
    total = math.ceil(len(train) / cfg.batch_size) * epochs
    run_name = "finetune" if name == "finetune" else f"finetune {name}"  # names a diverged run
    loss_of = _classifier_loss(model, train, weight, loss_fn, rt.device)
    steps = _Steps(model, opt, train_rt, loss_of, cfg, total, train.lengths, tracker, prefix, run_name, lr_key)
    gen = torch.Generator().manual_seed(cfg.seed)
    stopper, best_state, history = EarlyStopping(cfg.patience), None, []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=name, unit="step", dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        for rows in bucketed_batches(train.lengths, cfg.batch_size, gen):
            loss = steps(rows)
            tok_s = {"tok_s": f"{steps.tps:,.0f}"} if steps.tps else {}
            bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}", **tok_s, refresh=False)
            bar.update()
        with steps.meter.paused():  # validation time is not training throughput
            scores = _validate(model, val, n_classes, rt)
            history.append({"epoch": epoch, **scores})
            tracker.log_metrics({f"{prefix}{k}": v for k, v in scores.items()}, step=steps.step)
            acc, f1 = scores["val_accuracy"], scores["val_macro_f1"]
            bar.write(f"{name} epoch {epoch}: val accuracy {acc:.3f}, macro-F1 {f1:.3f}")
            if stopper.update(f1, epoch):
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}
        if stopper.stop:
            bar.write(f"{name}: no better macro-F1 for {cfg.patience} epochs, stopping after epoch {epoch}")
            break
    bar.close()
    seconds = time.perf_counter() - start
    tracker.log_metrics({f"{prefix}train_seconds": seconds, f"{prefix}best_epoch": stopper.best_epoch}, step=steps.step)
    best = unwrap(model).to("cpu")
    best.load_state_dict(best_state)
    best_acc = history[stopper.best_epoch - 1]["val_accuracy"]
    summary = (stopper.best_epoch, len(history), best_acc, stopper.best, seconds, n_params, train_rt.precision)
    return Trained(best.eval(), history, *summary)


def _classifier_loss(
    model: nn.Module,
    train: Examples,
    weight: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None,
    device: torch.device,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`loss_of` for `train_step`: a batch's row indices into `train` -> (weighted) cross-entropy, or `loss_fn`."""

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        n = train.lengths[rows]
        x, y = train.ids[rows, : int(n.max())].to(device), train.y[rows].to(device)
        logits = model(x, n.to(device)).float()  # (B, K)
        return F.cross_entropy(logits, y, weight=weight) if loss_fn is None else loss_fn(logits, y, rows)

    return loss_of


def _validate(model: nn.Module, val: Examples, n_classes: int, rt: Runtime) -> dict[str, float]:
    """Accuracy and macro-F1 of `model` (on `rt`'s device, left in training mode) on `val`, scored in `rt`."""
    pred = predict(model, val, rt)
    y = val.y.numpy()
    return {"val_accuracy": float((pred == y).mean()), "val_macro_f1": macro_f1(y, pred, n_classes)}


def _probe_loss(model: nn.Module, train: Examples, batch_size: int, rt: Runtime) -> torch.Tensor:
    """A scalar of one full-size training batch's logits (the first rows), for timing the precisions."""
    n = train.lengths[:batch_size]
    return model(train.ids[:batch_size, : int(n.max())].to(rt.device), n.to(rt.device)).float().square().mean()


def read_labeled(paths: Paths) -> tuple[list[str], pd.DataFrame]:
    """The training labels (sorted) and the cleaned labeled rows (text, label, split)."""
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    return sorted(data.loc[data["split"] == "train", "label"].unique()), data


def split_rows(data: pd.DataFrame, split: str, labels: list[str], paths: Paths) -> pd.DataFrame:
    """The rows of `split` whose label is one of `labels` (positions 0..n-1); none is a UserError."""
    rows = data[(data["split"] == split) & data["label"].isin(labels)].reset_index(drop=True)
    if rows.empty:
        raise UserError(f"{paths.clean_labeled}: no rows of split {split!r} with a training label")
    return rows


def encoder(paths: Paths, labels: list[str], max_length: int) -> Callable[[pd.DataFrame], Examples]:
    """Rows (text, label) -> Examples: the tokenizer in `paths.tokenizer`, at most `max_length` tokens a row."""
    tok = load_tokenizer(paths.tokenizer)
    pad_id = tok.token_to_id(PAD)
    index = {lab: i for i, lab in enumerate(labels)}

    def encode(df: pd.DataFrame) -> Examples:
        ids, lengths = encode_texts(tok, df["text"].tolist(), max_length, pad_id)
        return Examples(ids, lengths, torch.tensor(df["label"].map(index).to_numpy()))

    return encode


def load_examples(cfg: FinetuneConfig, paths: Paths, max_length: int) -> tuple[list[str], Examples, Examples]:
    """Labels (sorted) and the encoded train (capped per label) and validation examples."""
    labels, data = read_labeled(paths)
    train = cap_per_label(data[data["split"] == "train"], cfg.max_train_per_label, cfg.seed)
    val = split_rows(data, "val", labels, paths)
    encode = encoder(paths, labels, max_length)
    return labels, encode(train), encode(val)


@dataclass
class Teacher:
    """The fine-tuned classifier a compression stage starts from, with its data encoded as it was trained."""

    model: nn.Module
    meta: dict
    """Its config.json (kind, config, max_length, ...): a variant keeps everything but the shape."""
    labels: list[str]
    train: Examples
    val: Examples

    @property
    def extra(self) -> dict:
        """config.json entries besides kind and config, for a variant written from this model."""
        return {k: v for k, v in self.meta.items() if k not in ("kind", "config")}


def load_teacher(cfg: FinetuneConfig, paths: Paths) -> Teacher:
    """The fine-tuned classifier (`paths.classifier`) and the train/val examples, encoded at its max_length."""
    from models.checkpoint import load_classifier, read_config

    meta = read_config(paths.classifier)
    model = load_classifier(paths.classifier)
    labels, train, val = load_examples(cfg, paths, int(meta.get("max_length", cfg.max_length)))
    if labels != list(model.config.labels):
        raise UserError(
            f"{paths.classifier}: trained on labels {list(model.config.labels)}, "
            f"but {paths.clean_labeled} has {labels}; rerun finetune"
        )
    return Teacher(model, meta, labels, train, val)


def recipe(cfg: FinetuneConfig, epochs: int, lr: float) -> FinetuneConfig:
    """finetune's recipe with another length and peak lr (min_lr scaled alike); no early stopping."""
    return cfg.model_copy(update={"epochs": epochs, "lr": lr, "min_lr": cfg.min_lr * lr / cfg.lr, "patience": 0})


@dataclass
class Recovered:
    """A compressed model after its recovery fine-tune (as it was when nothing ran)."""

    model: nn.Module
    val_macro_f1: float
    """At the best validation epoch (the score before recovery when nothing ran)."""
    seconds: float
    history: list[dict]
    precision: str | None
    """What it trained in (None: nothing trained); `lmforge verify` replays it."""


def recover(
    name: str,
    model: nn.Module,
    t: Teacher,
    cfg: FinetuneConfig,
    rt: Runtime,
    tracker: Tracker,
    epochs: int,
    lr: float,
    lr_key: str,
    before: float,
) -> Recovered:
    """A short fine-tune of a compressed model with finetune's recipe at peak `lr` (0 epochs: as it is)."""
    if not epochs:
        return Recovered(model, before, 0.0, [], None)
    trained = fit(
        name, model, recipe(cfg, epochs, lr), t.train, t.val, len(t.labels), rt, tracker, epochs, lr_key=lr_key
    )
    return Recovered(trained.model, trained.val_macro_f1, trained.train_seconds, trained.history, trained.precision)


def val_scores(model: nn.Module, data: Examples, n_classes: int, rt: Runtime) -> dict[str, float]:
    """Validation accuracy and macro-F1 of `model` (4 places), scored in `rt` as `fit` scores its epochs.

    A stage compares a model before and after compression by passing the same `rt` here and to `fit`.
    """
    scores = _validate(model.to(rt.device), data, n_classes, rt)
    model.to("cpu")
    return {k: round(v, 4) for k, v in scores.items()}
