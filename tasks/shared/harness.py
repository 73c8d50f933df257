"""The stage harness: what `python -m tasks.<stage>` does around a stage's `run`.

Check the whole params.yaml (`load_params`: an unknown section or key, a key written twice, a bad value in any
section, an ingest input DVC would not track), then load the sections the stage declares (a declared section
missing from the file is an error, not the code defaults) and nothing else, open the stage's MLflow run,
refuse to replace an existing output lmforge did not write (tasks/shared/outputs.py), call it, write
`metrics/<stage>.json` atomically with what the stage cost (tasks/shared/cost.py), and turn a
UserError into one line on stderr with exit code 2, a tracking-store failure into one line with exit
code 3 (anything else keeps its traceback). Ctrl-C, SIGTERM and the death of the process that
started the stage (tasks/shared/lifeline.py) stop it cleanly: one line, exit code 130, no output
replaced by a partial one. However it ends, it writes its status (exit code and line) where the runner
asked (tasks/shared/stagerun.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable

from models.errors import ArtifactError
from tasks.shared import lifeline
from tasks.shared.config.base import Section, StageParams, load_stage_params
from tasks.shared.config.params import load_params  # validation only: outside the stages' DVC deps (ops/dag.py)
from tasks.shared.cost import Meter
from tasks.shared.datasets import log_stage_inputs
from tasks.shared.errors import UserError
from tasks.shared.io import write_json
from tasks.shared.outputs import check_replaceable, record
from tasks.shared.stagerun import (
    CRASH_EXIT,
    INTERRUPTED_EXIT,
    SUCCESS_EXIT,
    TRACKING_EXIT,
    USER_ERROR_EXIT,
    StageStatus,
    crash_line,
    error_line,
    failure_line,
    interrupted_line,
    write_status,
)
from tasks.shared.tracking import (
    PARAMS_ENV,
    NullTracker,
    Tracker,
    TrackingError,
    numeric,
    setup_tracking,
    stage_run,
    tracking_errors,
)

StageRun = Callable[[StageParams, Tracker], dict]


@dataclass(frozen=True)
class RunOptions:
    """How a stage's MLflow run records it."""

    system_metrics: bool = False
    """Sample CPU, memory, disk and network while it runs (MLflow system metrics): the training stages."""
    logged: Callable[[dict], dict[str, float]] = numeric
    """Which of its metrics (metrics/<stage>.json) the run logs: every numeric leaf unless the stage says less."""
    inputs: tuple[str, ...] = ()
    """The `paths` entries (stage outputs) it reads, logged as the run's MLflow datasets (tasks/shared/datasets.py)."""
    context: str = "training"
    """What it does with them (the datasets' context in MLflow): training, or evaluation."""


def metrics_file(params: StageParams, stage: str):
    return params.paths.metrics / f"{stage}.json"


def stage_main(
    stage: str, run: StageRun, sections: dict[str, type[Section]], options: RunOptions = RunOptions()
) -> None:
    """Entry point of `python -m tasks.<stage>`; `sections` are the params.yaml sections it reads
    (exactly its dvc.yaml `params:`, which tests/unit/test_dag.py checks)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"), help="params file")
    args = parser.parse_args()
    meter = Meter.start()
    lifeline.interrupt_on_sigterm()
    lifeline.watch(lifeline.stop_self())
    try:
        if not _run_stage(stage, run, sections, args.params, meter, options):
            return  # a torchrun worker of rank > 0: rank 0 reports
    except (UserError, ArtifactError) as e:  # bad input, or a missing/corrupt artifact: one line
        _end(stage, USER_ERROR_EXIT, error_line(stage, e))
    except TrackingError as e:  # the store went away: one line, and DVC does not record the stage as done
        _end(stage, TRACKING_EXIT, failure_line(stage, e))
    except KeyboardInterrupt:
        _end(stage, INTERRUPTED_EXIT, interrupted_line(stage))
    except Exception as e:  # an internal error keeps its traceback; the runner still learns how it ended
        write_status(StageStatus(stage, CRASH_EXIT, crash_line(stage, e)))
        raise
    write_status(StageStatus(stage, SUCCESS_EXIT))


def _run_stage(
    stage: str, run: StageRun, sections: dict[str, type[Section]], params_file: str, meter: Meter, options: RunOptions
) -> bool:
    """Load, check, run and record the stage; False for a torchrun worker of rank > 0 (it neither tracks
    nor reports)."""
    load_params(params_file)  # refuses a bad file in one line, whatever section is wrong; its value is not used
    params = load_stage_params(params_file, sections)
    if int(os.environ.get("RANK", 0)) > 0:  # a torchrun worker: rank 0 tracks and writes metrics
        run(params, NullTracker())
        return False
    check_replaceable(stage, params.paths)
    with tracking_errors():
        experiment_id = setup_tracking(params.tracking)
    with stage_run(params, stage, experiment_id, options.system_metrics) as tracker:
        log_stage_inputs(tracker, {name: getattr(params.paths, name) for name in options.inputs}, options.context)
        metrics = run(params, tracker)
        tracker.wait()  # the cost includes the stage's own MLflow writes landing
        cost = meter.stop().as_dict()
        metrics = {**metrics, "cost": cost}
        write_json(metrics_file(params, stage), metrics)
        record(stage, params.paths)  # lmforge wrote them, whatever the tracking store does next
        tracker.log_metrics(options.logged(metrics))
        tracker.set_tags({"lmforge.energy_source": cost["energy_source"]})
    return True


def _end(stage: str, code: int, line: str) -> None:
    """The one line on stderr, the status for the runner, and the exit code."""
    print(line, file=sys.stderr)
    write_status(StageStatus(stage, code, line))
    sys.exit(code)
