"""The tasks lmforge trains on the shared pretrained trunk, and what each one brings.

A task is its data builder, head, loss, metrics, gates and endpoints. Its stages live in dvc.yaml (DVC decides
what is stale); this registry says which stages and which promotion belong to which task, so the flow,
`lmforge promote` and the service iterate over the tasks `params.yaml` lists (`tasks.enabled`) without naming any.
Adding a task: its package (stages, parts), its entry here, its stages in dvc.yaml. Promotion functions are named
by import path (`module:function`): operations sit above the stages and this module sits below both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    """One task: its stages, its evaluation metrics, the registered model it promotes and where that happens."""

    name: str
    description: str
    stages: tuple[str, ...]
    """Its own DVC stages, in order (the shared stages ingest..pretrain belong to every task)."""
    metrics: str
    """Its evaluation's metrics file under `paths.metrics`."""
    registered_model: str
    """The `tracking` field naming its registered model in MLflow."""
    promote: str
    """`module:function` that gates, registers and promotes its candidate (`function(params, ...) -> Decision`)."""
    endpoints: tuple[str, ...]


SHARED_STAGES = ("ingest", "clean", "validate", "tokenize", "pretrain")
"""Stages every task needs: the data, its contracts, the tokenizer and the pretrained trunk."""

TASKS: dict[str, Task] = {
    "classification": Task(
        name="classification",
        description="sequence classification (the default: which stdlib package a text comes from)",
        stages=("finetune", "prune", "sparsify", "distill", "quantize", "onnx", "evaluate"),
        metrics="evaluate.json",
        registered_model="registered_model",
        promote="tasks.ops.promote:run",
        endpoints=("/classify", "/generate"),
    ),
    "kg": Task(
        name="kg",
        description="knowledge-graph construction: entity recognition, relation extraction, entity linking",
        stages=("kg_data", "kg_train", "kg_graph", "kg_evaluate"),
        metrics="extract.json",
        registered_model="extractor_model",
        promote="tasks.ops.promote_kg:run",
        endpoints=("/extract", "/graph/query"),
    ),
    "align": Task(
        name="align",
        description="contrastive alignment of text and code: a dual encoder, a vector index, search, zero-shot labels",
        stages=("align_data", "align_train", "align_index", "align_evaluate"),
        metrics="align.json",
        registered_model="encoder_model",
        promote="tasks.ops.promote_align:run",
        endpoints=("/search", "/embed"),
    ),
}


def task_of(stage: str) -> str | None:
    """The task that owns `stage`, or None for a shared stage (or one no task claims)."""
    return next((t.name for t in TASKS.values() if stage in t.stages), None)


def selected_stages(stages: list[str], enabled: list[str]) -> list[str]:
    """`stages` (dvc.yaml's order) without those of tasks that are not enabled."""
    return [s for s in stages if (owner := task_of(s)) is None or owner in enabled]


def registered_name(task: Task, tracking) -> str:
    """The registered model name of `task` under the `tracking` config."""
    return getattr(tracking, task.registered_model)


def promotion(task: Task) -> Callable:
    """The function that promotes `task`'s candidate (imported when called: the operations sit above this module)."""
    module, function = task.promote.split(":")
    return getattr(importlib.import_module(module), function)
