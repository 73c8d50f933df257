"""prune: structured pruning of the fine-tuned classifier (variant `pruned`).

Attention heads and MLP channels are scored on the validation split by the first-order Taylor estimate
of the loss change when they are removed (models/compression.py), the least important share of each
block is cut out (smaller matrices, fewer parameters, less compute), and a short fine-tune with
finetune's recipe recovers what the cut cost. The result is an ordinary classifier folder whose config
records each block's heads and channels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from models.checkpoint import write_classifier
from models.compression import count_params, keep_top, prune_structured, taylor_importance
from tasks.shared.classify import load_teacher, recover, val_scores
from tasks.shared.config.base import Paths
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.config.prune import PruneConfig
from tasks.shared.engine.runtime import setup_runtime
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed
from tasks.shared.variants import write_skipped

SECTIONS = {"prune": PruneConfig, "finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`): finetune's recipe drives the recovery."""


@dataclass
class PruneResult:
    enabled: bool
    params_before: int = 0
    params_after: int = 0
    layer_heads: list[int] | None = None
    layer_ffn: list[int] | None = None
    val_macro_f1_teacher: float = 0.0
    val_macro_f1_pruned: float = 0.0
    """Right after the cut, before recovery."""
    val_macro_f1_recovered: float = 0.0
    recovery_seconds: float = 0.0
    precision: str | None = None
    """What the recovery fine-tune trained in (None: no recovery)."""

    @property
    def metrics(self) -> dict:
        d = asdict(self)
        if self.enabled:
            d["params_removed"] = round(1 - self.params_after / self.params_before, 4)
        return d


def run(cfg: PruneConfig, ft: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> PruneResult:
    tracker = tracker or NullTracker()
    if not cfg.enabled:
        write_skipped(paths.pruned, "prune.enabled is false in params.yaml")
        return PruneResult(enabled=False)
    require_passed(paths.validation)
    t = load_teacher(ft, paths)
    rt = setup_runtime(ft)
    n = ft.batch_size
    val = t.val
    starts = range(0, len(val), n)
    if cfg.importance_batches:
        starts = starts[: cfg.importance_batches]
    batches = [
        (val.ids[i : i + n, : int(val.lengths[i : i + n].max())], val.lengths[i : i + n], val.y[i : i + n])
        for i in starts
    ]
    heads, ffn = taylor_importance(t.model, batches)
    pruned = prune_structured(t.model, keep_top(heads, cfg.heads), keep_top(ffn, cfg.ffn))
    k = len(t.labels)
    teacher_f1 = val_scores(t.model, val, k, rt)["val_macro_f1"]
    cut_f1 = val_scores(pruned, val, k, rt)["val_macro_f1"]
    print(
        f"prune: {count_params(t.model):,} -> {count_params(pruned):,} parameters; "
        f"validation macro-F1 {teacher_f1:.4f} -> {cut_f1:.4f} before recovery"
    )
    rec = recover(
        "prune", pruned, t, ft, rt, tracker, cfg.recovery_epochs, cfg.recovery_lr, "prune.recovery_lr", cut_f1
    )
    pruned = rec.model
    trunk = pruned.config.trunk
    with atomic_dir(paths.pruned) as d:
        write_classifier(pruned, d, extra={**t.extra, "variant": "pruned", "prune": cfg.model_dump(mode="json")})
        (d / "history.json").write_text(json.dumps(rec.history))
    return PruneResult(
        enabled=True,
        params_before=count_params(t.model),
        params_after=count_params(pruned),
        layer_heads=list(trunk.layer_heads),
        layer_ffn=list(trunk.layer_ffn),
        val_macro_f1_teacher=teacher_f1,
        val_macro_f1_pruned=cut_f1,
        val_macro_f1_recovered=round(rec.val_macro_f1, 4),
        recovery_seconds=round(rec.seconds, 2),
        precision=rec.precision,
    )


def main() -> None:
    stage_main(
        "prune",
        lambda p, t: run(p.prune, p.finetune, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("clean_labeled",)),
    )


if __name__ == "__main__":
    main()
