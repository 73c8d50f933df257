"""`tasks:` — which tasks the pipeline trains, evaluates, promotes and serves (an operation, not a stage)."""

from __future__ import annotations

from pydantic import Field, field_validator

from tasks.shared.config.base import Section
from tasks.shared.tasks import TASKS


class TasksConfig(Section):
    """The tasks a pipeline run covers (tasks/shared/tasks.py lists what each one is)."""

    enabled: list[str] = Field(default_factory=lambda: ["classification", "kg", "align"], min_length=1)
    """Tasks whose stages the flow runs and whose models `lmforge promote` gates and registers, in this order;
    the shared stages (ingest .. pretrain) always run. `dvc repro <stage>` runs any stage regardless."""

    @field_validator("enabled")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; tasks are {sorted(TASKS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a task is listed twice: {v}")
        return v
