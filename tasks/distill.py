"""distill: knowledge distillation of the fine-tuned classifier into a smaller student (variant `distilled`).

The student has `distill.n_layer` blocks (and optionally another width); at the teacher's width it
starts as a copy of evenly spaced teacher blocks, embeddings, final norm and head (DistilBERT's recipe).
It trains with finetune's recipe on loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE,
the teacher's logits computed once for the whole training split. The best validation epoch is kept.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch

from models.checkpoint import write_classifier
from models.compression import count_params, distillation_loss, student_from_teacher
from tasks.shared.classify import fit, load_teacher, recipe, val_scores
from tasks.shared.config.base import Paths
from tasks.shared.config.distill import DistillConfig
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.engine.runtime import setup_runtime
from tasks.shared.errors import UserError
from tasks.shared.harness import RunOptions, stage_main
from tasks.shared.io import atomic_dir
from tasks.shared.tracking import NullTracker, Tracker
from tasks.shared.validation import require_passed
from tasks.shared.variants import write_skipped

SECTIONS = {"distill": DistillConfig, "finetune": FinetuneConfig}
"""The params.yaml sections this stage reads (its dvc.yaml `params:`): finetune's recipe drives the training."""


@dataclass
class DistillResult:
    enabled: bool
    teacher_params: int = 0
    student_params: int = 0
    student_layers: int = 0
    copied_teacher_blocks: list[int] | None = None
    val_macro_f1_teacher: float = 0.0
    val_macro_f1_student: float = 0.0
    train_seconds: float = 0.0
    precision: str | None = None
    """What the student trained in."""

    @property
    def metrics(self) -> dict:
        return asdict(self)


@torch.no_grad()
def teacher_logits(model, data, batch_size: int = 128) -> torch.Tensor:
    """The teacher's logits (N, K) for every example, computed once."""
    model.eval()
    out = []
    for i in range(0, len(data), batch_size):
        n = data.lengths[i : i + batch_size]
        out.append(model(data.ids[i : i + batch_size, : int(n.max())], n).float())
    return torch.cat(out)


def run(cfg: DistillConfig, ft: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> DistillResult:
    tracker = tracker or NullTracker()
    if not cfg.enabled:
        write_skipped(paths.distilled, "distill.enabled is false in params.yaml")
        return DistillResult(enabled=False)
    require_passed(paths.validation)
    t = load_teacher(ft, paths)
    trunk = t.model.config.trunk
    if cfg.n_layer > trunk.n_layer:
        raise UserError(f"params.yaml: distill.n_layer: {cfg.n_layer} exceeds the teacher's {trunk.n_layer} blocks")
    if cfg.n_embd and cfg.n_embd % trunk.head_dim:
        raise UserError(
            f"params.yaml: distill.n_embd: {cfg.n_embd} is not a multiple of the teacher's head size {trunk.head_dim}"
        )
    rt = setup_runtime(ft)
    k = len(t.labels)
    soft = teacher_logits(t.model, t.train).to(rt.device)
    torch.manual_seed(ft.seed)
    student, copied = student_from_teacher(t.model, cfg.n_layer, cfg.n_embd or None)

    def loss_fn(logits: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return distillation_loss(logits, soft[rows.to(soft.device)], y, cfg.temperature, cfg.alpha)

    teacher_f1 = val_scores(t.model, t.val, k, rt)["val_macro_f1"]
    trained = fit(
        "distill",
        student,
        recipe(ft, cfg.epochs, cfg.lr),
        t.train,
        t.val,
        k,
        rt,
        tracker,
        cfg.epochs,
        lr_key="distill.lr",
        loss_fn=loss_fn,
    )
    with atomic_dir(paths.distilled) as d:
        write_classifier(
            trained.model,
            d,
            extra={**t.extra, "variant": "distilled", "distill": cfg.model_dump(mode="json"), "teacher_blocks": copied},
        )
        (d / "history.json").write_text(json.dumps(trained.history))
    return DistillResult(
        enabled=True,
        teacher_params=count_params(t.model),
        student_params=count_params(trained.model),
        student_layers=cfg.n_layer,
        copied_teacher_blocks=copied,
        val_macro_f1_teacher=teacher_f1,
        val_macro_f1_student=round(trained.val_macro_f1, 4),
        train_seconds=round(trained.train_seconds, 2),
        precision=trained.precision,
    )


def main() -> None:
    stage_main(
        "distill",
        lambda p, t: run(p.distill, p.finetune, p.paths, t).metrics,
        SECTIONS,
        RunOptions(system_metrics=True, inputs=("clean_labeled",)),
    )


if __name__ == "__main__":
    main()
