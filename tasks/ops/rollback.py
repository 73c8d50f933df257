"""rollback: point `champion` back at an earlier registered version (an operation, not a stage).

By default it restores the previous champion: the alias history (`lmforge history`) is replayed as a
stack (a promotion pushes, a rollback removes the version rolled back from), so a version once rolled
back from is not restored by the next rollback. Only versions that passed their gates are eligible;
moving @champion to one that failed them needs `force` and a reason, and the override is recorded (the
version's `override` tag and the alias history). A registry whose history does not say falls back to the
newest gate-passing version older than the champion.
"""

from __future__ import annotations

from tasks.ops.registry import ALIAS, alias_history, current_champion, move_champion, override_reason
from tasks.shared.config.params import Params
from tasks.shared.errors import UserError
from tasks.shared.tasks import TASKS, registered_name
from tasks.shared.tracking import setup_tracking


def failed_gates(tags: dict[str, str]) -> list[str]:
    """Names of the gates a registered version failed (its `gate.<name>` tags)."""
    return sorted(k[len("gate.") :] for k, v in tags.items() if k.startswith("gate.") and v.startswith("fail"))


def champion_stack(events: list[dict]) -> list[str]:
    """The versions that were @champion, the current one last, with every version rolled back from removed.

    `events` are @champion's history records, oldest first: a promotion pushes its version; a rollback
    drops the version it left and brings its target to the top. A record written before records had an
    `action` is a rollback if it moved to an older version (a promotion always registers a newer one).
    """
    stack: list[str] = []
    for ev in events:
        to, frm = str(ev["to"]), ev.get("from")
        action = ev.get("action") or ("rollback" if frm is not None and int(to) < int(frm) else "promote")
        if action == "rollback" and frm is not None:
            stack = [v for v in stack if v != str(frm)]
        stack = [v for v in stack if v != to] + [to]
    return stack


def previous_champion(client, name: str, current: str) -> str | None:
    """The gate-passing version that was @champion before `current`, by the alias history; None if it does not say."""
    stack = champion_stack(alias_history(client, name, ALIAS))
    if not stack or stack[-1] != current:
        return None
    for v in reversed(stack[:-1]):
        if client.get_model_version(name, v).tags.get("gates") == "passed":
            return v
    return None


def run(
    params: Params, to_version: str | None = None, force: bool = False, reason: str | None = None, task: str = ""
) -> str:
    """Point `champion` of `task`'s registered model (default: the classifier) at `to_version`, or at the previous
    champion that passed its gates (see the module docstring)."""
    from mlflow.exceptions import MlflowException

    from mlflow import MlflowClient

    override_reason(force, reason)
    setup_tracking(params.tracking)
    client = MlflowClient()
    name = registered_name(TASKS[task or "classification"], params.tracking)
    champion = current_champion(client, name)
    if to_version is None:
        if champion is None:
            raise UserError(f"registered model {name!r} has no @{ALIAS} to roll back from")
        to_version = previous_champion(client, name, champion["version"])
        if to_version is None:
            versions = client.search_model_versions(f"name='{name}'")
            older = [
                v for v in versions if int(v.version) < int(champion["version"]) and v.tags.get("gates") == "passed"
            ]
            if not older:
                raise UserError(f"{name}: no gate-passing version older than v{champion['version']}")
            to_version = max(older, key=lambda v: int(v.version)).version
    try:
        mv = client.get_model_version(name, str(to_version))
    except MlflowException:
        raise UserError(f"{name}: version {to_version} does not exist") from None
    previous = champion["version"] if champion else None
    if previous == str(to_version):
        print(f"@{ALIAS} of {name} already points at v{to_version}; nothing changed")
        return str(to_version)
    passed = mv.tags.get("gates") == "passed"
    if not passed and not force:
        failed = ", ".join(failed_gates(mv.tags)) or "gates not recorded"
        raise UserError(
            f"{name} v{to_version} did not pass its gates ({failed}); "
            f'to make it @{ALIAS} anyway: lmforge rollback --to {to_version} --force --reason "why"'
        )
    why = (reason or "").strip() or (f"rollback from v{previous}" if previous else "rollback")
    move_champion(client, name, str(to_version), why, previous, override=not passed, action="rollback")
    note = " (gates overridden, recorded)" if not passed else ""
    print(f"@{ALIAS} of {name} now points at v{to_version}{note}" + (f" (was v{previous})" if previous else ""))
    return str(to_version)
