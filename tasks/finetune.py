"""finetune: a classification head on the pretrained trunk, and the baselines trained beside it.

Every model goes through the same loop on the same batches (`classify.fit` on the engine's one training
step: device, autocast, optimizer, schedule, gradient clipping); the epoch with the best validation
macro-F1 is kept and `patience` stops a run early. The pretrained classifier goes to `paths.classifier` (compress,
evaluate and promote use it). The baselines go to `paths.baselines/<name>/` for evaluate to compare:
`scratch` is the same Transformer randomly initialised (what pretraining buys), `cnn` and `gru` are
small classic text classifiers (models/baselines.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from models.baselines import CNNClassifier, CNNConfig, GRUClassifier, GRUConfig
from models.checkpoint import load_lm, write_classifier
from models.classifier import ClassifierConfig, TransformerClassifier
from models.transformer import GPTConfig
from tasks.shared.classify import fit, load_examples
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.runtime import device_name, setup_runtime
from tasks.shared.errors import UserError
from tasks.shared.harness import stage_main
from tasks.shared.io import atomic_dir, write_csv
from tasks.shared.plots import line_chart, publish
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed

SECTIONS = {"finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
VALIDATION_PLOT = "finetune_validation.csv"
"""Per-epoch validation scores of the pretrained classifier in `paths.plots` (dvc.yaml `plots:`)."""


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


def baseline_model(name: str, cfg: FinetuneConfig, trunk: GPTConfig, labels: list[str]) -> nn.Module:
    """A freshly initialised baseline classifier (seeded with `cfg.seed`)."""
    torch.manual_seed(cfg.seed)
    if name == "scratch":
        return TransformerClassifier(ClassifierConfig(trunk=trunk, labels=labels, pooling=cfg.pooling))
    common = {"vocab_size": trunk.vocab_size, "labels": labels, "dropout": cfg.baseline_dropout}
    if name == "cnn":
        return CNNClassifier(
            CNNConfig(n_embd=cfg.cnn_embd, channels=cfg.cnn_channels, kernel_sizes=cfg.cnn_kernel_sizes, **common)
        )
    if name == "gru":
        return GRUClassifier(GRUConfig(n_embd=cfg.gru_embd, hidden=cfg.gru_hidden, pooling=cfg.pooling, **common))
    raise ValueError(f"unknown baseline {name!r}")


def plot_validation(histories: dict[str, list[dict]], path: Path):
    """Validation macro-F1 per epoch of every model finetune trained, on one chart."""
    lines = [
        (name, [h["epoch"] for h in hist], [h["val_macro_f1"] for h in hist], "o-") for name, hist in histories.items()
    ]
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
    precision: str
    """What the pretrained classifier trained in (`precision: auto` on CPU: timed, see `probe_cpu_precision`); the
    validation scores are in the configured precision."""
    baselines: dict[str, dict]
    """Per baseline: best_epoch, epochs_run, val_accuracy, val_macro_f1, train_seconds, params."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


def run(cfg: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> FinetuneResult:
    tracker = tracker or NullTracker()
    require_passed(paths.validation)
    lm = load_lm(paths.lm)
    if cfg.max_length > lm.config.block_size:
        raise UserError(
            f"params.yaml: finetune.max_length: {cfg.max_length} exceeds the LM block_size {lm.config.block_size}"
        )
    labels, train, val = load_examples(cfg, paths, cfg.max_length)
    rt = setup_runtime(cfg)
    tracker.log_params({"device": device_name(rt.device)})  # precision: per model, logged by fit (timed under `auto`)
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
        baselines[name] = fit(
            name, model, recipe, train, val, len(labels), rt, tracker, epochs, prefix=f"{name}/", lr_key=lr_key
        )

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
        device=device_name(rt.device),
        precision=main.precision,
        baselines={n: t.summary() for n, t in baselines.items()},
    )


def main() -> None:
    stage_main("finetune", lambda p, t: run(p.finetune, p.paths, t).metrics, SECTIONS)


if __name__ == "__main__":
    main()
