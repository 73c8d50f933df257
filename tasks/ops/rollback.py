"""rollback: point `champion` back at an earlier registered version (an operation, not a stage)."""

from __future__ import annotations

from tasks.ops.promote import ALIAS, current_champion
from tasks.shared.config.params import Params
from tasks.shared.errors import UserError
from tasks.shared.tracking import setup_tracking


def run(params: Params, to_version: str | None = None) -> str:
    """Point `champion` at `to_version`, or at the newest gate-passing version older than the current one."""
    from mlflow import MlflowClient

    setup_tracking(params.tracking)
    client = MlflowClient()
    name = params.tracking.registered_model
    champion = current_champion(client, name)
    if to_version is None:
        if champion is None:
            raise UserError(f"registered model {name!r} has no @{ALIAS} to roll back from")
        versions = client.search_model_versions(f"name='{name}'")
        older = [v for v in versions if int(v.version) < int(champion["version"]) and v.tags.get("gates") == "passed"]
        if not older:
            raise UserError(f"{name}: no gate-passing version older than v{champion['version']}")
        to_version = max(older, key=lambda v: int(v.version)).version
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(to_version))
    except MlflowException:
        raise UserError(f"{name}: version {to_version} does not exist") from None
    client.set_registered_model_alias(name, ALIAS, str(to_version))
    print(f"@{ALIAS} of {name} now points at v{to_version}" + (f" (was v{champion['version']})" if champion else ""))
    return str(to_version)
