"""The stage harness: what `python -m tasks.<stage>` does around a stage's `run`.

Load the sections the stage declares (nothing else of params.yaml), open the stage's MLflow run,
refuse to replace an existing output lmforge did not write (tasks/shared/outputs.py), call it, write
`metrics/<stage>.json` atomically, and turn a UserError into one line on stderr with
exit code 2, a tracking-store failure into one line with exit code 3 (anything else keeps its
traceback). Ctrl-C, SIGTERM and the death of the process that
started the stage (tasks/shared/lifeline.py) stop it cleanly: one line, exit code 130, no output
replaced by a partial one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from models.errors import ArtifactError
from tasks.shared import lifeline
from tasks.shared.config.base import Section, StageParams, load_stage_params
from tasks.shared.errors import UserError
from tasks.shared.io import write_json
from tasks.shared.outputs import check_replaceable, record
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

USER_ERROR_EXIT = 2
TRACKING_EXIT = 3
"""The tracking store failed: not the user's input, and a later rerun (or the flow's retry) can succeed."""
INTERRUPTED_EXIT = 130


def metrics_file(params: StageParams, stage: str):
    return params.paths.metrics / f"{stage}.json"


def stage_main(stage: str, run: Callable[[StageParams, Tracker], dict], sections: dict[str, type[Section]]) -> None:
    """Entry point of `python -m tasks.<stage>`; `sections` are the params.yaml sections it reads
    (exactly its dvc.yaml `params:`, which tests/unit/test_dag.py checks)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"), help="params file")
    args = parser.parse_args()
    start = time.perf_counter()
    lifeline.interrupt_on_sigterm()
    lifeline.watch(lifeline.stop_self())
    try:
        params = load_stage_params(args.params, sections)
        if int(os.environ.get("RANK", 0)) > 0:  # a torchrun worker: rank 0 tracks and writes metrics
            run(params, NullTracker())
            return
        check_replaceable(stage, params.paths)
        with tracking_errors():
            experiment_id = setup_tracking(params.tracking)
        with stage_run(params, stage, experiment_id) as tracker:
            metrics = run(params, tracker)
            metrics = {**metrics, "stage_seconds": round(time.perf_counter() - start, 2)}
            write_json(metrics_file(params, stage), metrics)
            record(stage, params.paths)  # lmforge wrote them, whatever the tracking store does next
            tracker.log_metrics(numeric(metrics))
    except (UserError, ArtifactError) as e:  # bad input, or a missing/corrupt artifact: one line
        print(f"lmforge {stage}: error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except TrackingError as e:  # the store went away: one line, and DVC does not record the stage as done
        print(f"lmforge {stage}: failed: {e}", file=sys.stderr)
        sys.exit(TRACKING_EXIT)
    except KeyboardInterrupt:
        print(f"lmforge {stage}: interrupted; its outputs were not replaced (a rerun starts it again)", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)
