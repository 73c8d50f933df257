"""The retrain schedule: the cron and timezone of the `retrain` deployment in prefect.yaml, validated.

`lmforge schedule` checks it before it starts anything, and the retrain flow (flows/retrain.py) serves it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import yaml

from tasks.shared.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = "retrain"
"""The deployment in prefect.yaml whose schedule `lmforge schedule` serves."""


def cron_schedule(prefect_yaml: Path = ROOT / "prefect.yaml") -> tuple[str, str]:
    """(cron, timezone) of the `retrain` deployment in prefect.yaml: the one place the schedule is set."""
    try:
        spec = yaml.safe_load(prefect_yaml.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{prefect_yaml}: {e}") from None
    for dep in spec.get("deployments") or []:
        if dep.get("name") == DEPLOYMENT:
            for sched in dep.get("schedules") or []:
                if sched.get("cron"):
                    return str(sched["cron"]), str(sched.get("timezone") or "UTC")
    raise UserError(f"{prefect_yaml}: deployments: no `{DEPLOYMENT}` deployment with a cron schedule")


def check_schedule(cron: str | None = None, timezone: str | None = None):
    """The validated schedule (prefect.yaml's unless overridden) and when it next fires."""
    from prefect.server.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    default_cron, default_tz = cron_schedule()
    cron, timezone = cron or default_cron, timezone or default_tz
    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as e:
        raise UserError(f"schedule {cron!r} ({timezone}): {e.errors()[0]['msg']}") from None
    return cron, timezone, asyncio.run(schedule.get_dates(n=1))[0]
