"""The model registry's bookkeeping: which version each alias points at, and every move of an alias.

`champion` is what the service serves; `candidate` the newest evaluated (registered) version. Every move
of either is recorded first as a registered-model tag `alias.history.<ns since epoch>` holding a JSON
record (when, from which version to which, why, who, whether gates were overridden, and which action:
promote, rollback or evaluate), then made. `lmforge promote` and `lmforge rollback` move them,
`lmforge history` prints the records, and `lmforge retrain` compares with @champion's lineage.
"""

from __future__ import annotations

import getpass
import json
import time
from datetime import datetime, timezone

from tasks.shared.errors import UserError

ALIAS = "champion"
CANDIDATE = "candidate"
"""Aliases: `champion` is what the service serves; `candidate` is the newest evaluated (registered) version."""
HISTORY_TAG = "alias.history."
"""Registered-model tags `alias.history.<ns since epoch>`: one JSON record per move of @champion or @candidate."""
LEGACY_HISTORY_TAG = "champion.history."
"""Where records were kept before @candidate existed (moves of @champion only); still read."""


def override_reason(force: bool, reason: str | None) -> str:
    """`reason` stripped; a forced move of @champion without one is refused (the override must say why)."""
    reason = (reason or "").strip()
    if force and not reason:
        raise UserError('--force needs --reason "why": the override is recorded in the registry')
    return reason


def current_version(client, name: str, alias: str = ALIAS):
    """The model version `alias` points at, or None (no model, no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def stored_macro_f1(mv) -> float | None:
    """The test macro-F1 a model version was registered with (its `test_macro_f1` tag), None if unreadable."""
    try:
        return float(mv.tags["test_macro_f1"])
    except (KeyError, ValueError):
        return None


def current_champion(client, name: str) -> dict | None:
    """{version, macro_f1 (its stored `test_macro_f1`, None if unreadable)} of @champion, or None."""
    mv = current_version(client, name)
    if mv is None:
        return None
    return {"version": str(mv.version), "macro_f1": stored_macro_f1(mv)}


def move_alias(
    client,
    name: str,
    alias: str,
    version: str,
    reason: str,
    previous: str | None,
    override: bool = False,
    action: str = "promote",
) -> dict:
    """Point `alias` at `version`, recording when, from which version, why, who and whether gates were overridden.

    `action` (promote, rollback, evaluate) lets rollback find the champion before the current one. The
    record is written before the alias moves, so no move (least of all an override) goes unrecorded.
    """
    event = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "alias": alias,
        "from": previous,
        "to": str(version),
        "reason": reason,
        "override": override,
        "user": getpass.getuser(),
        "action": action,
    }
    client.set_registered_model_tag(name, f"{HISTORY_TAG}{time.time_ns()}", json.dumps(event))
    if override:
        client.set_model_version_tag(
            name, str(version), "override", f"{event['time']} {event['user']}: {reason}"[:5000]
        )
    client.set_registered_model_alias(name, alias, str(version))
    return event


def move_champion(
    client, name: str, version: str, reason: str, previous: str | None, override: bool = False, action: str = "promote"
) -> dict:
    """`move_alias` for @champion."""
    return move_alias(client, name, ALIAS, version, reason, previous, override, action)


def alias_history(client, name: str, alias: str | None = None) -> list[dict]:
    """Every recorded move of @champion and @candidate (or of `alias` only), oldest first.

    Records written before @candidate existed carry no `alias`: they are moves of @champion."""
    model = client.get_registered_model(name)
    events = []
    for k, v in (model.tags or {}).items():
        for prefix in (HISTORY_TAG, LEGACY_HISTORY_TAG):
            if k.startswith(prefix) and k[len(prefix) :].isdigit():
                events.append((int(k[len(prefix) :]), {"alias": ALIAS, **json.loads(v)}))
    return [ev for _, ev in sorted(events, key=lambda e: e[0]) if alias is None or ev["alias"] == alias]
