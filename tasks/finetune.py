"""finetune: a classification head on the pretrained trunk, and the baselines trained beside it.

Every model goes through the same loop on the same batches (tasks/engine.py: device, autocast,
optimizer, schedule, gradient clipping); the epoch with the best validation macro-F1 is kept and
`patience` stops a run early. The pretrained classifier goes to `paths.classifier` (compress,
evaluate and promote use it). The baselines go to `paths.baselines/<name>/` for evaluate to compare:
`scratch` is the same Transformer randomly initialised (what pretraining buys), `cnn` and `gru` are
small classic text classifiers (models/baselines.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.checkpoint import load_lm, write_classifier
from models.classifier import ClassifierConfig, TransformerClassifier
from models.tokenizer import PAD, encode_texts, load_tokenizer
from models.transformer import GPTConfig
from tasks.shared import engine
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, read_parquet, write_csv
from tasks.shared.plots import line_chart, publish
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed

SECTIONS = {"finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
LOG_EVERY = 10
"""Steps between train-loss logs to the tracker."""
VALIDATION_PLOT = "finetune_validation.csv"
"""Per-epoch validation scores of the pretrained classifier in `paths.plots` (dvc.yaml `plots:`)."""


def cap_per_label(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most `cap` rows per label (seeded sample); 0 keeps everything."""
    if not cap:
        return df
    return df.sample(frac=1.0, random_state=seed).groupby("label").head(cap).sort_index()


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def freeze_trunk(model: TransformerClassifier, freeze: str | int) -> list[str]:
    """Turn off gradients for the frozen part of the trunk (see `FinetuneConfig.freeze`); returns the frozen names."""
    trunk = model.trunk
    embeddings = [m for m in (trunk.wte, trunk.wpe) if m is not None]
    if freeze == "none":
        frozen: list[nn.Module] = []
    elif freeze == "embeddings":
        frozen = embeddings
    elif freeze == "trunk":
        frozen = [trunk]
    else:
        if freeze > len(trunk.blocks):
            raise UserError(f"params.yaml: finetune.freeze: {freeze} exceeds the LM's {len(trunk.blocks)} blocks")
        frozen = [*embeddings, *trunk.blocks[:freeze]] if freeze else []  # 0 blocks: nothing, like `none`
    for module in frozen:
        module.requires_grad_(False)
    return [n for n, p in model.named_parameters() if not p.requires_grad]


def layer_lr_scales(model: TransformerClassifier, decay: float) -> dict[str, float]:
    """lr multiplier per parameter: 1 for the head and final norm, decay**k for the k-th block from the
    top, decay**(n_layer + 1) for the embeddings."""
    n_layer = len(model.trunk.blocks)
    scales = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["trunk", "blocks"]:
            depth = n_layer - int(parts[2])
        elif parts[1] in ("wte", "wpe") and parts[0] == "trunk":
            depth = n_layer + 1
        else:
            depth = 0
        scales[name] = decay**depth
    return scales


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


@torch.no_grad()
def predict(model: nn.Module, data: Examples, rt: engine.Runtime, batch_size: int = 128) -> np.ndarray:
    """Predicted class indices (N,)."""
    model.eval()
    preds = []
    for i in range(0, len(data), batch_size):
        n = data.lengths[i : i + batch_size]
        x = data.ids[i : i + batch_size, : int(n.max())].to(rt.device)
        with rt.autocast():
            preds.append(model(x, n.to(rt.device)).argmax(-1).cpu())
    model.train()
    return torch.cat(preds).numpy()


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

    def summary(self) -> dict:
        keys = ("best_epoch", "epochs_run", "val_accuracy", "val_macro_f1", "train_seconds", "params")
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items() if k in keys}


def fit(
    name: str,
    model: nn.Module,
    cfg: FinetuneConfig,
    train: Examples,
    val: Examples,
    n_classes: int,
    rt: engine.Runtime,
    tracker: Tracker,
    epochs: int,
    lr_scale: dict[str, float] | None = None,
    prefix: str = "",
    lr_key: str = "finetune.lr",
) -> Trained:
    """Train `model` for up to `epochs` on `train`, keep the epoch with the best macro-F1 on `val`.

    Metrics go to `tracker` as `<prefix><metric>`; every model sees the same batch order. A nan or
    inf loss stops the stage with a UserError naming the step and `lr_key` (the params.yaml key of the lr).
    """
    from tqdm import tqdm

    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    model = engine.wrap_model(model, rt, "ddp", cfg.compile)
    opt = engine.build_optimizer(engine.unwrap(model), cfg, rt.device, lr_scale)  # names without compile's prefix
    weight = balanced_class_weights(train.y, n_classes).to(rt.device) if cfg.class_weights == "balanced" else None
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    stopper, best_state, history = EarlyStopping(cfg.patience), None, []
    start = time.perf_counter()
    bar = tqdm(total=total, desc=name, unit="step", dynamic_ncols=True)
    meter, step, tps = engine.Throughput(rt.device), 0, None
    run_name = "finetune" if name == "finetune" else f"finetune {name}"  # names a diverged run
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            n = train.lengths[b]
            x, y = train.ids[b, : int(n.max())].to(rt.device), train.y[b].to(rt.device)
            lr = engine.lr_at(step, total, cfg)
            engine.set_lr(opt, lr)
            with rt.autocast():
                logits = model(x, n.to(rt.device))  # (B, K)
            loss = F.cross_entropy(logits.float(), y, weight=weight)
            (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
            grad_norm = engine.clip_and_step(model, opt, rt, cfg.grad_clip)
            loss_value = loss.item()
            engine.check_finite(run_name, step, lr, rt, cfg.grad_clip, loss=loss_value, grad_norm=grad_norm, lr_key=lr_key)
            meter.step(int(n.sum()))
            if step % LOG_EVERY == 0:
                rec = {"train_loss": loss_value, "lr": lr, "grad_norm": grad_norm}
                if (rate := meter.window_rate()) is not None:
                    rec["tokens_per_s"] = tps = rate
                tracker.log_metrics({f"{prefix}{k}": v for k, v in rec.items()}, step=step)
            bar.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", **({"tok_s": f"{tps:,.0f}"} if tps else {}), refresh=False)
            bar.update()
            step += 1
        with meter.paused():  # validation time is not training throughput
            pred = predict(model, val, rt)
            y_val = val.y.numpy()
            acc, f1 = float((pred == y_val).mean()), macro_f1(y_val, pred, n_classes)
            history.append({"epoch": epoch, "val_accuracy": acc, "val_macro_f1": f1})
            tracker.log_metrics({f"{prefix}val_accuracy": acc, f"{prefix}val_macro_f1": f1}, step=step)
            bar.write(f"{name} epoch {epoch}: val accuracy {acc:.3f}, macro-F1 {f1:.3f}")
            if stopper.update(f1, epoch):
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in engine.unwrap(model).state_dict().items()}
        if stopper.stop:
            bar.write(f"{name}: no better macro-F1 for {cfg.patience} epochs, stopping after epoch {epoch}")
            break
    bar.close()
    seconds = time.perf_counter() - start
    tracker.log_metrics({f"{prefix}train_seconds": seconds, f"{prefix}best_epoch": stopper.best_epoch}, step=step)
    best = engine.unwrap(model).to("cpu")
    best.load_state_dict(best_state)
    best_acc = history[stopper.best_epoch - 1]["val_accuracy"]
    return Trained(best.eval(), history, stopper.best_epoch, len(history), best_acc, stopper.best, seconds, n_params)


def baseline_model(name: str, cfg: FinetuneConfig, trunk: GPTConfig, labels: list[str]) -> nn.Module:
    """A freshly initialised baseline classifier (seeded with `cfg.seed`)."""
    torch.manual_seed(cfg.seed)
    if name == "scratch":
        return TransformerClassifier(ClassifierConfig(trunk=trunk, labels=labels, pooling=cfg.pooling))
    common = {"vocab_size": trunk.vocab_size, "labels": labels, "dropout": cfg.baseline_dropout}
    if name == "cnn":
        return CNNClassifier(CNNConfig(n_embd=cfg.cnn_embd, channels=cfg.cnn_channels, kernel_sizes=cfg.cnn_kernel_sizes, **common))
    if name == "gru":
        return GRUClassifier(GRUConfig(n_embd=cfg.gru_embd, hidden=cfg.gru_hidden, pooling=cfg.pooling, **common))
    raise ValueError(f"unknown baseline {name!r}")


def plot_validation(histories: dict[str, list[dict]], path: Path):
    """Validation macro-F1 per epoch of every model finetune trained, on one chart."""
    lines = [(name, [h["epoch"] for h in hist], [h["val_macro_f1"] for h in hist], "o-") for name, hist in histories.items()]
    return line_chart(lines, path, "epoch", "validation macro-F1", "Fine-tuning: pretrained Transformer vs baselines")


@dataclass
class FinetuneResult:
    train_examples: int
    best_epoch: int
    epochs_run: int
    val_accuracy: float
    val_macro_f1: float
    train_seconds: float
    trainable_params: int
    device: str
    baselines: dict[str, dict]
    """Per baseline: best_epoch, epochs_run, val_accuracy, val_macro_f1, train_seconds, params."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


def load_examples(cfg: FinetuneConfig, paths: Paths, max_length: int) -> tuple[list[str], Examples, Examples]:
    """Labels (sorted) and the encoded train (capped per label) and validation examples."""
    tok = load_tokenizer(paths.tokenizer)
    pad_id = tok.token_to_id(PAD)
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    labels = sorted(data.loc[data["split"] == "train", "label"].unique())
    index = {lab: i for i, lab in enumerate(labels)}
    train = cap_per_label(data[data["split"] == "train"], cfg.max_train_per_label, cfg.seed)
    val = data[(data["split"] == "val") & data["label"].isin(index)]
    if val.empty:
        raise UserError(f"{paths.clean_labeled}: no validation rows with a training label")

    def encode(df: pd.DataFrame) -> Examples:
        ids, lengths = encode_texts(tok, df["text"].tolist(), max_length, pad_id)
        return Examples(ids, lengths, torch.tensor(df["label"].map(index).to_numpy()))

    return labels, encode(train), encode(val)


def run(cfg: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> FinetuneResult:
    tracker = tracker or NullTracker()
    require_passed(paths.validation)
    lm = load_lm(paths.lm)
    if cfg.max_length > lm.config.block_size:
        raise UserError(f"params.yaml: finetune.max_length: {cfg.max_length} exceeds the LM block_size {lm.config.block_size}")
    labels, train, val = load_examples(cfg, paths, cfg.max_length)
    rt = engine.setup_runtime(cfg)
    tracker.log_params({"device": engine.device_name(rt.device), "precision": rt.precision})
    extra = {"max_length": cfg.max_length, "train_config": cfg.model_dump(mode="json")}

    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(ClassifierConfig(trunk=lm.config, labels=labels, pooling=cfg.pooling))
    model.trunk.load_state_dict(lm.state_dict())
    frozen = set(freeze_trunk(model, cfg.freeze))
    trainable = sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    scales = layer_lr_scales(model, cfg.layer_lr_decay) if cfg.layer_lr_decay < 1 else None
    main = fit("finetune", model, cfg, train, val, len(labels), rt, tracker, cfg.epochs, scales)

    with atomic_dir(paths.classifier) as d:
        write_classifier(main.model, d, extra=extra)
        (d / "history.json").write_text(json.dumps(main.history))
    write_csv(Path(paths.plots) / VALIDATION_PLOT, main.history, ["epoch", "val_accuracy", "val_macro_f1"])

    # Baselines train every layer at one lr: freezing and layer-wise decay only make sense for pretrained weights.
    # `scratch` keeps the recipe (what pretraining buys); small models from scratch want their own lr and epochs.
    lr = cfg.baseline_lr or cfg.lr
    small = cfg.model_copy(update={"lr": lr, "min_lr": cfg.min_lr * lr / cfg.lr})
    baselines = {}
    for name in cfg.baselines:
        model = baseline_model(name, cfg, lm.config, labels)
        recipe, epochs = (cfg, cfg.epochs) if name == "scratch" else (small, cfg.baseline_epochs or cfg.epochs)
        lr_key = "finetune.lr" if recipe is cfg or not cfg.baseline_lr else "finetune.baseline_lr"
        baselines[name] = fit(name, model, recipe, train, val, len(labels), rt, tracker, epochs, prefix=f"{name}/", lr_key=lr_key)

    with atomic_dir(paths.baselines) as d:
        for name, trained in baselines.items():
            (d / name).mkdir()
            write_classifier(trained.model, d / name, extra={**extra, "baseline": name})
            (d / name / "history.json").write_text(json.dumps(trained.history))
        # train_seconds stays in the stage's metrics: the same training must give the same folder bytes
        summary = {n: {k: v for k, v in t.summary().items() if k != "train_seconds"} for n, t in baselines.items()}
        (d / "summary.json").write_text(json.dumps(summary, indent=2))
        histories = {"pretrained": main.history, **{n: t.history for n, t in baselines.items()}}
        publish(tracker, plot_validation(histories, d / "validation_curves.png"), "validation_curves.png")
    return FinetuneResult(
        train_examples=len(train),
        best_epoch=main.best_epoch,
        epochs_run=main.epochs_run,
        val_accuracy=round(main.val_accuracy, 4),
        val_macro_f1=round(main.val_macro_f1, 4),
        train_seconds=round(main.train_seconds, 2),
        trainable_params=trainable,
        device=engine.device_name(rt.device),
        baselines={n: t.summary() for n, t in baselines.items()},
    )


def main() -> None:
    stage_main("finetune", lambda p, t: run(p.finetune, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
