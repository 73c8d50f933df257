"""MLflow plumbing: store setup, one nested run per stage, non-blocking metric logging.

Nothing here runs at import time; `setup_tracking()` is called by the CLI, the flow or the stage harness.
A stage run nests under the pipeline run named by LMFORGE_PARENT_RUN_ID (the Prefect flow sets it) or,
inside `dvc exp run`, under one run per DVC experiment, so every experiment is one MLflow run too.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from tasks.shared.config.base import StageParams, TrackingConfig

PARENT_RUN_ENV = "LMFORGE_PARENT_RUN_ID"
PARAMS_ENV = "LMFORGE_PARAMS"
DVC_EXP_ENV = "DVC_EXP_NAME"
"""Set by `dvc exp run` for the stages of one experiment."""
SYSTEM_METRICS_INTERVAL_S = 10.0
"""Seconds between two samples of a training stage's system metrics (CPU, memory, disk, network; GPU with pynvml),
unless MLflow's own SAMPLING_ENV sets another."""
SAMPLING_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"


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

    def log_table(self, columns: dict[str, list], name: str) -> None: ...

    def log_params(self, params: dict) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_input(
        self, name: str, sources: list[str], digest: str, context: str, tags: dict[str, str] | None = None
    ) -> None: ...

    def child(self, name: str, tags: dict[str, str]) -> AbstractContextManager["Tracker"]:
        """A run nested under this one (e.g. one per evaluated model), closed at the end of the block."""
        return nullcontext(NullTracker())


class NullTracker(Tracker):
    """Logs nothing (unit tests, library use)."""


class TrackingError(RuntimeError):
    """The tracking store failed (unreachable, or writes lost): the stage is not done; a rerun can succeed."""


class MlflowTracker(Tracker):
    """Asynchronous writes, each one checked: a write the store lost (after MLflow's own retries with
    backoff) fails the stage — during a long loop at its next log call, at the latest in `wait` before
    the stage counts as done — so a store that went away mid-run never silently drops metrics.

    The loop never waits on the store: a checker thread waits on each write in turn (MLflow's
    `RunOperations.wait`) and keeps the failures; a log call only looks whether one was kept."""

    def __init__(self, run_id: str, synchronous: bool = False) -> None:
        import mlflow

        self._mlflow = mlflow
        self.run_id = run_id
        self.synchronous = synchronous
        """Write each call at once: a run that logs a few summaries, not a loop (waiting on asynchronous writes
        costs about a second a run)."""
        self._pending: queue.Queue = queue.Queue()  # RunOperations of writes not yet known to have landed
        self._checker: threading.Thread | None = None
        self._written = 0
        self._lost: list[Exception] = []

    def _track(self, ops) -> None:
        self._written += 1
        if self._checker is None:
            self._checker = threading.Thread(target=self._check, name="lmforge-tracking-check", daemon=True)
            self._checker.start()
        self._pending.put(ops)
        if self._lost:  # the store lost a write after MLflow's own retries: stop now, not at the end
            self.wait()

    def _check(self) -> None:
        """Wait for each write in turn, keeping the failures, until `wait` sends None."""
        while (ops := self._pending.get()) is not None:
            try:
                ops.wait()
            except Exception as e:  # noqa: BLE001 - any failed write is a lost write
                self._lost.append(e)
            finally:
                self._pending.task_done()
        self._pending.task_done()

    def wait(self) -> None:
        """Block until every asynchronous write has landed; TrackingError if any was lost."""
        if self._checker is not None:
            self._pending.put(None)
            self._checker.join()
            self._checker = None
        if self._lost:
            first = str(self._lost[0]).splitlines()[0][:300]
            raise TrackingError(
                f"MLflow tracking store {self._mlflow.get_tracking_uri()} "
                f"lost {len(self._lost)} of {self._written} asynchronous writes "
                f"of this stage ({first}); the stage is not recorded as done: rerun it once the store answers"
            )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # Asynchronous: a synchronous log_metric on sqlite costs ~20 ms per call.
        values = {k: float(v) for k, v in metrics.items()}
        if self.synchronous:
            self._mlflow.log_metrics(values, step=step, synchronous=True)
        else:
            self._track(self._mlflow.log_metrics(values, step=step, synchronous=False))

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

    def log_table(self, columns: dict[str, list], name: str) -> None:
        """A table artifact (`name` ends in .json) that the MLflow UI shows and compares across runs."""
        self._mlflow.log_table(data=columns, artifact_file=name)

    def log_params(self, params: dict) -> None:
        if self.synchronous:
            self._mlflow.log_params(params, synchronous=True)
        else:
            self._track(self._mlflow.log_params(params, synchronous=False))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.synchronous:
            self._mlflow.set_tags(tags, synchronous=True)
        else:
            self._track(self._mlflow.set_tags(tags, synchronous=False))

    def log_input(
        self, name: str, sources: list[str], digest: str, context: str, tags: dict[str, str] | None = None
    ) -> None:
        """An input dataset of the run (MLflow's Inputs) read from `sources` (paths), named by `digest`
        (its DVC hash); the dataset's source is their common folder (the one path, if there is one)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path, either way
            warnings.simplefilter("ignore")
            src = resolve_dataset_source(os.path.commonpath(sources))
        dataset = MetaDataset(source=src, name=name, digest=digest)
        self._mlflow.log_input(dataset, context=context, tags={"source": json.dumps(sources), **(tags or {})})

    @contextmanager
    def child(self, name: str, tags: dict[str, str]) -> Iterator["MlflowTracker"]:
        """A run nested under this one, active inside the block, that writes synchronously (a summary: one batch
        of metrics, a table; not a loop); its writes have landed when the block ends."""
        experiment = self._mlflow.get_run(self.run_id).info.experiment_id
        with self._mlflow.start_run(
            experiment_id=experiment, run_name=name, nested=True, parent_run_id=self.run_id, tags=tags
        ) as run:
            child = MlflowTracker(run.info.run_id, synchronous=True)
            try:
                yield child
            except BaseException:
                self._mlflow.flush_async_logging()
                raise
            child.wait()


def dvc_experiment_run(experiment_id: str, params_file: Path) -> str | None:
    """Inside `dvc exp run`: the MLflow run of this DVC experiment (found by name, else created)."""
    import mlflow
    from mlflow import MlflowClient

    name = os.environ.get(DVC_EXP_ENV)
    if not name:
        return None
    found = mlflow.search_runs(
        [experiment_id], filter_string=f"tags.`lmforge.dvc_exp` = '{name}'", max_results=1, output_format="list"
    )
    if found:
        return found[0].info.run_id
    tags = {
        "lmforge.stage": "experiment",
        "lmforge.dvc_exp": name,
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "mlflow.source.git.commit": git_commit(),
    }
    from mlflow.entities import Param

    from tasks.shared.config.base import read_params_file

    client = MlflowClient()
    run = client.create_run(experiment_id, run_name=f"dvc exp {name}", tags=tags)
    everything = [Param(k, str(v)[:6000]) for k, v in flatten(read_params_file(params_file)).items()]
    for i in range(0, len(everything), 100):  # the experiment's whole params.yaml, for comparing runs
        client.log_batch(run.info.run_id, params=everything[i : i + 100])
    client.set_terminated(run.info.run_id)  # a grouping run: its stages are the nested runs
    return run.info.run_id


@contextmanager
def stage_run(
    params: StageParams, stage: str, experiment_id: str, system_metrics: bool = False
) -> Iterator[MlflowTracker]:
    """An MLflow run for one stage, nested under the pipeline run or the DVC experiment's run; `system_metrics`:
    MLflow samples CPU, memory, disk and network every SYSTEM_METRICS_INTERVAL_S seconds in a thread of its own
    (the run's *System metrics* charts), stopped when the run ends."""
    import mlflow

    if system_metrics and not os.environ.get(SAMPLING_ENV):  # the user's own interval wins
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    with tracking_errors():
        parent = os.environ.get(PARENT_RUN_ENV) or dvc_experiment_run(experiment_id, params.file)
        tags = {"lmforge.stage": stage, "mlflow.source.git.commit": git_commit()}
        if os.environ.get(DVC_EXP_ENV):
            tags["lmforge.dvc_exp"] = os.environ[DVC_EXP_ENV]
        with mlflow.start_run(
            run_name=stage, parent_run_id=parent or None, tags=tags, log_system_metrics=system_metrics or None
        ) as run:
            resolved = {name: section.model_dump(mode="json") for name, section in params.sections.items()}
            mlflow.log_params(flatten(resolved))
            mlflow.log_dict({"paths": params.paths.model_dump(mode="json"), **resolved}, "params.json")
            tracker = MlflowTracker(run.info.run_id)
            try:
                yield tracker
            except BaseException:
                mlflow.flush_async_logging()
                raise
            tracker.wait()  # every metric landed, or the stage fails (the run ends FAILED)


@contextmanager
def tracking_errors() -> Iterator[None]:
    """An MLflow failure (store unreachable, request failed after MLflow's own retries) as one TrackingError line."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = str(getattr(e, "message", e)).splitlines()[0][:300]
        raise TrackingError(f"MLflow tracking store {os.environ.get('MLFLOW_TRACKING_URI', '?')}: {first}") from None


def numeric(metrics: dict) -> dict[str, float]:
    """The numeric leaves of a nested metrics dict, with dotted keys."""
    return {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
