"""`orchestrate:` — where stages run and how the flow treats I/O failures (an operation, not a stage).

Nothing here changes what a model is built from, so no stage reads it and it is not part of a model's
lineage: moving pretraining to a GPU worker does not make `lmforge retrain` think the model changed.
"""

from __future__ import annotations

from pydantic import Field

from tasks.shared.config.base import Section


class OrchestrateConfig(Section):
    """Placement of stages on work pools, and retries of the flow's I/O steps."""

    placement: bool = False
    """Run `gpu_stages` as the `gpu_deployment` on another worker (`run_deployment`); stage outputs travel
    through the DVC remote."""
    gpu_stages: list[str] = Field(default_factory=lambda: ["pretrain", "finetune"])
    """Stages placed on the `gpu` work pool when `placement` is on; the others run where the flow runs."""
    gpu_deployment: str = "lmforge-stage/gpu"
    """Prefect deployment (`flow/deployment`, prefect.yaml) that runs one stage on a `gpu` pool worker."""
    stage_timeout_s: float = Field(86400.0, gt=0)
    """Longest wait for a placed stage, queueing included; past it the flow run is cancelled and retried."""
    io_retries: int = Field(4, ge=0)
    """Retries of `dvc push`/`dvc pull` and of the placed stage's hand-off (exponential backoff with jitter)."""
    io_retry_delay_s: float = Field(2.0, ge=0)
    """First backoff delay; each retry waits about twice as long (±50% jitter)."""
    io_timeout_s: float = Field(3600.0, gt=0)
    """Longest one `dvc push`/`dvc pull` or hand-off may take before it is stopped (and retried)."""
