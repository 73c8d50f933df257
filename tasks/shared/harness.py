"""The stage harness: what `python -m tasks.<stage>` does around a stage's `run`.

Load the sections the stage declares (nothing else of params.yaml), open the stage's MLflow run,
call it, write `metrics/<stage>.json` atomically, and turn a UserError into one line on stderr with
exit code 2 (anything else keeps its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

from tasks.shared.config.base import Section, StageParams, load_stage_params
from tasks.shared.errors import UserError
from tasks.shared.io import write_json
from tasks.shared.tracking import PARAMS_ENV, NullTracker, Tracker, numeric, setup_tracking, stage_run

USER_ERROR_EXIT = 2


def metrics_file(params: StageParams, stage: str):
    return params.paths.metrics / f"{stage}.json"


def stage_main(stage: str, run: Callable[[StageParams, Tracker], dict], sections: dict[str, type[Section]]) -> None:
    """Entry point of `python -m tasks.<stage>`; `sections` are the params.yaml sections it reads
    (exactly its dvc.yaml `params:`, which tests/unit/test_dag.py checks)."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{stage}", description=f"Run the {stage} stage.")
    parser.add_argument("--params", default=os.environ.get(PARAMS_ENV, "params.yaml"), help="params file")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        params = load_stage_params(args.params, sections)
        if int(os.environ.get("RANK", 0)) > 0:  # a torchrun worker: rank 0 tracks and writes metrics
            run(params, NullTracker())
            return
        experiment_id = setup_tracking(params.tracking)
        with stage_run(params, stage, experiment_id) as tracker:
            metrics = run(params, tracker)
            metrics = {**metrics, "stage_seconds": round(time.perf_counter() - start, 2)}
            write_json(metrics_file(params, stage), metrics)
            tracker.log_metrics(numeric(metrics))
    except UserError as e:
        print(f"lmforge {stage}: error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
