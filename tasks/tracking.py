"""MLflow plumbing: store setup, one nested run per stage, non-blocking metric logging.

Nothing here runs at import time; `setup_tracking()` is called by the CLI, the flow or a stage main.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tasks.config import Params, TrackingConfig, load_params
from tasks.errors import UserError

PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
PARAMS_ENV = "LMFORGE_PARAMS"


def tracking_uri(cfg: TrackingConfig) -> str:
    """`MLFLOW_TRACKING_URI` if set, else params' uri with a relative sqlite path made absolute."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        db = Path(uri[len(prefix) :]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(db)
    return uri


def setup_tracking(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    import mlflow

    uri = tracking_uri(cfg)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # stage subprocesses inherit it
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.experiment)
    if exp is None:
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = cfg.artifacts.resolve().as_uri() if local else None
        exp_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    """What a stage's `run` may log; the MLflow version never blocks a training loop."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...

    def log_figure(self, figure, name: str) -> None: ...

    def log_dict(self, obj: dict, name: str) -> None: ...

    def log_params(self, params: dict) -> None: ...


class NullTracker(Tracker):
    """Logs nothing (unit tests, library use)."""


class MlflowTracker(Tracker):
    def __init__(self, run_id: str) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Asynchronous: a synchronous log_metric on sqlite costs ~20 ms per call.
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step, synchronous=False)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_figure(self, figure, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    def log_dict(self, obj: dict, name: str) -> None:
        self._mlflow.log_dict(obj, name)

    def log_params(self, params: dict) -> None:
        self._mlflow.log_params(params, synchronous=False)


@contextmanager
def stage_run(params: Params, stage: str) -> Iterator[MlflowTracker]:
    """An MLflow run for one stage, nested under the pipeline run named by LMFORGE_PARENT_RUN_ID."""
    import mlflow

    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"lmforge.stage": stage, "mlflow.source.git.commit": git_commit()}
    with mlflow.start_run(run_name=stage, parent_run_id=parent or None, tags=tags) as run:
        section = params.section(stage).model_dump(mode="json")
        mlflow.log_params({f"{stage}.{k}": v for k, v in flatten(section).items()})
        mlflow.log_dict(params.model_dump(mode="json", by_alias=True), "params.json")
        tracker = MlflowTracker(run.info.run_id)
        try:
            yield tracker
        finally:
            mlflow.flush_async_logging()


def numeric(metrics: dict) -> dict[str, float]:
    """The numeric leaves of a nested metrics dict, with dotted keys."""
    return {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_main(stage: str, run: Callable[[Params, Tracker], dict]) -> None:
    """Entry point of `python -m tasks.<stage>`: load params, track, run, write metrics/<stage>.json.

    A UserError becomes one line on stderr and exit code 2; anything else keeps its traceback.
    """
    from tasks.io import write_json

    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"), help="params file")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        if int(os.environ.get("RANK", 0)) > 0:  # a torchrun worker: rank 0 tracks and writes metrics
            run(params, NullTracker())
            return
        setup_tracking(params.tracking)
        with stage_run(params, stage) as tracker:
            metrics = run(params, tracker)
            metrics = {**metrics, "stage_seconds": round(time.perf_counter() - start, 2)}
            write_json(params.paths.metrics / f"{stage}.json", metrics)
            tracker.log_metrics(numeric(metrics))
    except UserError as e:
        print(f"lmforge {stage}: error: {e}", file=sys.stderr)
        sys.exit(2)
