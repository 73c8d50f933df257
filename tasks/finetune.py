"""finetune: a classification head on the pretrained trunk, and the baselines trained beside it.

Every model goes through the same loop on the same batches (`classify.fit` on the engine's one training
step: device, autocast, optimizer, schedule, gradient clipping); the epoch with the best validation
macro-F1 is kept and `patience` stops a run early. The pretrained classifier goes to `paths.classifier` (compress,
evaluate and promote use it). The baselines go to `paths.baselines/<name>/` for evaluate to compare:
`scratch` is the same Transformer randomly initialised (what pretraining buys), `cnn` and `gru` are
small classic text classifiers (models/baselines.py), `short` is the pretrained classifier by the same recipe
on the same rows cut to their first LONG_TOKENS (128) tokens, and its folder says `max_length: 128`, so
evaluate and serving read at most that many too (what reading whole functions buys). How each is built and
which recipe it trains with is tasks/shared/classifiers.py (the learning curve trains the same models).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from models.checkpoint import load_lm, write_classifier
from tasks.shared.classifiers import baseline_recipe, build_baseline, pretrained_classifier
from tasks.shared.classify import fit, load_examples
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.runtime import device_name, setup_runtime
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir, write_csv
from tasks.shared.plots import line_chart, publish
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed

SECTIONS = {"finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`)."""
VALIDATION_PLOT = "finetune_validation.csv"
"""Per-epoch validation scores of the pretrained classifier in `paths.plots` (dvc.yaml `plots:`)."""


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
    lm = load_lm(paths.lm)  # each model reads it at its own max_length (classifiers.read_longer)
    labels, train, val = load_examples(cfg, paths, cfg.max_length)
    rt = setup_runtime(cfg)
    tracker.log_params({"device": device_name(rt.device)})  # precision: per model, logged by fit (timed under `auto`)
    extra = {"max_length": cfg.max_length, "train_config": cfg.model_dump(mode="json")}

    model, scales, trainable = pretrained_classifier(lm, labels, cfg)
    main = fit("finetune", model, cfg, train, val, len(labels), rt, tracker, cfg.epochs, scales)

    with atomic_dir(paths.classifier) as d:
        write_classifier(main.model, d, extra=extra)
        (d / "history.json").write_text(json.dumps(main.history))
    write_csv(Path(paths.plots) / VALIDATION_PLOT, main.history, ["epoch", "val_accuracy", "val_macro_f1"])

    baselines, reads = {}, {}
    for name in cfg.baselines:
        recipe, epochs, lr_key = baseline_recipe(name, cfg)
        model, scales = build_baseline(name, recipe, lm, labels)
        n = reads[name] = recipe.max_length  # `short`: the same rows, cut to their first 128 tokens
        baselines[name] = fit(
            name,
            model,
            recipe,
            train.cut(n),
            val.cut(n),
            len(labels),
            rt,
            tracker,
            epochs,
            scales,
            prefix=f"{name}/",
            lr_key=lr_key,
        )

    with atomic_dir(paths.baselines) as d:
        for name, trained in baselines.items():
            (d / name).mkdir()
            write_classifier(trained.model, d / name, extra={**extra, "baseline": name, "max_length": reads[name]})
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
    stage_main(
        "finetune",
        lambda p, t: run(p.finetune, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("clean_labeled",)),
    )


if __name__ == "__main__":
    main()
