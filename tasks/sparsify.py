"""sparsify: global unstructured magnitude pruning of the fine-tuned classifier (variant `sparse`).

`torch.nn.utils.prune.global_unstructured` zeroes the smallest weights over every classification Linear
at once; a short fine-tune with the masks in place lets the remaining weights compensate, then the masks
are folded in (`prune.remove`) so the saved tensors are plain. The matrices keep their dense shapes and
dense kernels multiply the zeros like any other number: this variant is no faster and no smaller on
disk. It measures how much of the model is redundant, and is the input a sparse kernel or a
compressing store would need.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from models.checkpoint import write_classifier
from models.compression import magnitude_masks, make_permanent, sparsity
from tasks.shared.classify import load_teacher, recover, val_scores
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.config.sparsify import SparsifyConfig
from tasks.shared.engine.runtime import setup_runtime
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed
from tasks.shared.variants import write_skipped

SECTIONS = {"sparsify": SparsifyConfig, "finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`): finetune's recipe drives the recovery."""


@dataclass
class SparsifyResult:
    enabled: bool
    sparsity: float = 0.0
    """Share of zero weights over the classification Linears, as saved."""
    val_macro_f1_teacher: float = 0.0
    val_macro_f1_pruned: float = 0.0
    """Right after masking, before recovery."""
    val_macro_f1_recovered: float = 0.0
    recovery_seconds: float = 0.0
    precision: str | None = None
    """What the recovery fine-tune trained in (None: no recovery)."""
    speedup: str = "none: dense kernels compute the zeros too"

    @property
    def metrics(self) -> dict:
        return asdict(self)


def run(cfg: SparsifyConfig, ft: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> SparsifyResult:
    tracker = tracker or NullTracker()
    if not cfg.enabled:
        write_skipped(paths.sparse, "sparsify.enabled is false in params.yaml")
        return SparsifyResult(enabled=False, speedup="")
    require_passed(paths.validation)
    t = load_teacher(ft, paths)
    rt = setup_runtime(ft)
    k = len(t.labels)
    masked = magnitude_masks(t.model, cfg.sparsity)
    teacher_f1 = val_scores(t.model, t.val, k, rt)["val_macro_f1"]
    cut_f1 = val_scores(masked, t.val, k, rt)["val_macro_f1"]
    print(
        f"sparsify: {cfg.sparsity:.0%} of Linear weights zeroed; "
        f"validation macro-F1 {teacher_f1:.4f} -> {cut_f1:.4f} before recovery"
    )
    rec = recover(
        "sparsify", masked, t, ft, rt, tracker, cfg.recovery_epochs, cfg.recovery_lr, "sparsify.recovery_lr", cut_f1
    )
    sparse = make_permanent(rec.model).eval()
    with atomic_dir(paths.sparse) as d:
        write_classifier(sparse, d, extra={**t.extra, "variant": "sparse", "sparsify": cfg.model_dump(mode="json")})
        (d / "history.json").write_text(json.dumps(rec.history))
    return SparsifyResult(
        enabled=True,
        sparsity=round(sparsity(sparse), 4),
        val_macro_f1_teacher=teacher_f1,
        val_macro_f1_pruned=cut_f1,
        val_macro_f1_recovered=round(rec.val_macro_f1, 4),
        recovery_seconds=round(rec.seconds, 2),
        precision=rec.precision,
    )


def main() -> None:
    stage_main(
        "sparsify",
        lambda p, t: run(p.sparsify, p.finetune, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("clean_labeled",)),
    )


if __name__ == "__main__":
    main()
