"""Scheduled retraining: the pipeline flow, skipped when it would rebuild the current champion.

`retrain` compares the workspace with the lineage of `@champion` (tasks/ops/lineage.py): when
`dvc status` reports nothing stale and the data, code and params digests equal the champion's, it stops
in seconds, registers nothing and leaves a Prefect artifact saying why. Otherwise it runs the pipeline
(DVC reruns only what is stale) and promotes through the gates.

How it runs:
- `lmforge retrain` — once, now, on this machine (Prefect's ephemeral server unless PREFECT_API_URL is set);
- `make schedule` / `lmforge schedule` — `retrain.serve()` on this machine with the cron schedule of the
  `retrain` deployment in prefect.yaml, for users without a Prefect server;
- `lmforge deploy` + `lmforge worker --pool cpu` — the `retrain` deployment on a Prefect server's `cpu`
  work pool (prefect.yaml), where its schedule fires.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.pipeline import execute, prepare, run_stages
from flows.stages import user_error
from tasks.ops.dag import stage_names
from tasks.ops.lineage import compare_with_champion
from tasks.ops.lock import DEFAULT_TIMEOUT, workspace_lock
from tasks.ops.schedule import DEPLOYMENT, check_schedule
from tasks.shared.errors import UserError
from tasks.shared.stagerun import USER_ERROR_EXIT
from tasks.shared.tasks import TASKS, registered_name, selected_stages


@task(
    retries=3,
    retry_delay_seconds=[2, 4, 8],
    retry_jitter_factor=0.5,
    retry_condition_fn=lambda t, r, s: not isinstance(s.result(raise_on_failure=False), UserError),
)
def compare(model: str, stages: list[str] | None = None) -> dict:
    """Would a run rebuild @champion of `model`, given the `stages` a run covers? (registry reads are retried with
    backoff.)"""
    from mlflow import MlflowClient

    c = compare_with_champion(MlflowClient(), model, stages=stages)
    return {"changed": c.changed, "reason": c.reason, "champion": c.champion}


def compare_tasks(params) -> dict:
    """The verdict over every enabled task: a run is needed when one task's champion would be rebuilt (or has none
    yet); the first such task's reason, else the first task's."""
    stages = selected_stages(stage_names(Path.cwd()), params.tasks.enabled)
    verdicts = [compare(registered_name(TASKS[t], params.tracking), stages) for t in params.tasks.enabled]
    return next((v for v in verdicts if v["changed"]), verdicts[0])


@flow(name="lmforge-retrain", log_prints=True)
def retrain(promote: bool = True, force: bool = False, lock_timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Retrain and promote through the gates, unless data, code and params equal @champion's lineage (or `force`)."""
    logger = get_run_logger()
    try:
        with workspace_lock(Path.cwd(), f"lmforge retrain (Prefect flow run {flow_run.name or '?'})", lock_timeout):
            params = prepare()  # under the lock: the first use of the MLflow store creates it
            verdict = compare_tasks(params)
            if not verdict["changed"] and not force:
                line = f"nothing changed: {verdict['reason']}; skipped, registered nothing"
                create_markdown_artifact(
                    key="lmforge-retrain",
                    markdown=(
                        f"## Retrain skipped\n\n{line}.\n\n"
                        "`lmforge retrain --force` (or the flow parameter `force`) runs it anyway.\n"
                    ),
                    description=f"retrain skipped: champion v{verdict['champion']} is current",
                )
                logger.info(f"lmforge retrain: {line}")
                return {"skipped": True, **verdict}
            logger.info(
                f"lmforge retrain: {'forced' if force and not verdict['changed'] else 'running the pipeline'}: "
                f"{verdict['reason']}"
            )
            create_markdown_artifact(
                key="lmforge-retrain",
                markdown=f"## Retrain ran\n\nWhy: {verdict['reason']}{' (forced)' if force else ''}.\n",
                description="why retrain ran",
            )
            result = run_stages(params, promote, run_name=f"retrain {flow_run.name or ''}".strip())
            return result if not isinstance(result, dict) else {"skipped": False, **verdict, **result}
    except UserError as e:
        return user_error(str(e))


def serve(cron: str | None = None, timezone: str | None = None) -> None:
    """Serve the retrain schedule from this process until stopped (Prefect's `flow.serve`; the Prefect
    server in PREFECT_API_URL runs the scheduler — `lmforge schedule` starts one when there is none)."""
    from prefect.schedules import Cron

    cron, timezone, due = check_schedule(cron, timezone)
    print(
        f"lmforge schedule: serving deployment lmforge-retrain/{DEPLOYMENT} on `{cron}` ({timezone}); "
        f"next run due {due.isoformat(timespec='minutes')}; Ctrl-C stops",
        flush=True,
    )
    retrain.serve(
        name=DEPLOYMENT,
        schedule=Cron(cron, timezone=timezone),
        description="lmforge retrain on this machine (make schedule)",
        print_starting_message=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.retrain", description="Retrain unless nothing changed since @champion."
    )
    parser.add_argument(
        "--force", action="store_true", help="run even when data, code and params equal @champion's lineage"
    )
    parser.add_argument("--no-promote", dest="promote", action="store_false", help="skip the gates and promotion")
    parser.add_argument(
        "--lock-timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for another run on this workspace"
    )
    parser.add_argument("--serve", action="store_true", help="serve the schedule until stopped instead of running once")
    parser.add_argument("--cron", help="with --serve: override prefect.yaml's cron")
    parser.add_argument("--timezone", help="with --serve: override prefect.yaml's timezone")
    args = parser.parse_args(argv)
    if args.serve:
        try:
            serve(args.cron, args.timezone)
        except UserError as e:
            print(f"lmforge: error: {e}", file=sys.stderr)
            return USER_ERROR_EXIT
        except KeyboardInterrupt:
            print("lmforge schedule: stopped", file=sys.stderr)
            return 0
        return 0
    return execute(
        "retrain",
        lambda: retrain(promote=args.promote, force=args.force, lock_timeout=args.lock_timeout, return_state=True),
        args.lock_timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
