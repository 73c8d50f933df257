"""Moving @champion in a real MLflow registry (sqlite): gates respected, overrides recorded, history kept."""

from __future__ import annotations

import pytest
from conftest import write_params

from tasks.ops import rollback
from tasks.ops.registry import ALIAS, alias_history, move_champion
from tasks.shared.config.params import load_params
from tasks.shared.errors import UserError

NAME = "lmforge-classifier"


@pytest.fixture
def registry(tmp_path, monkeypatch, mlflow_db):
    """Versions 1 (passed), 2 (passed), 3 (failed min_accuracy and smoke_test); @champion on v2."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path, **{"tracking.artifacts": str(tmp_path / "artifacts")}))
    client = MlflowClient(tracking_uri=mlflow_db)
    client.create_registered_model(NAME)
    (tmp_path / "model").mkdir()
    gates = {"1": "passed", "2": "passed", "3": "failed"}
    for v, verdict in gates.items():
        mv = client.create_model_version(NAME, source=str(tmp_path / "model"))
        assert str(mv.version) == v
        client.set_model_version_tag(NAME, v, "gates", verdict)
        client.set_model_version_tag(
            NAME, v, "gate.min_accuracy", "pass: ok" if verdict == "passed" else "fail: accuracy 0.10 vs floor 0.40"
        )
        client.set_model_version_tag(
            NAME, v, "gate.smoke_test", "pass: ok" if verdict == "passed" else "fail: could not load"
        )
        client.set_model_version_tag(NAME, v, "test_macro_f1", "0.5")
    move_champion(client, NAME, "2", "promoted: every gate passed", None)
    return params, client


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, ALIAS).version)


def test_rollback_goes_to_the_previous_passing_version_and_is_recorded(registry):
    params, client = registry
    assert rollback.run(params) == "1"
    assert champion(client) == "1"
    last = alias_history(client, NAME)[-1]
    assert (last["from"], last["to"], last["override"]) == ("2", "1", False)
    assert last["reason"] == "rollback from v2"


@pytest.mark.parametrize("force,reason", [(False, None), (False, "because"), (True, None), (True, "  ")])
def test_a_version_that_failed_its_gates_needs_force_and_a_reason(registry, force, reason):
    params, client = registry
    with pytest.raises(UserError) as e:
        rollback.run(params, "3", force=force, reason=reason)
    assert "\n" not in str(e.value)
    assert ("min_accuracy, smoke_test" in str(e.value)) if not force else ("--reason" in str(e.value))
    assert champion(client) == "2"
    assert len(alias_history(client, NAME)) == 1  # nothing moved, nothing recorded


def test_a_forced_move_is_recorded_on_the_version_and_in_the_history(registry):
    params, client = registry
    assert rollback.run(params, "3", force=True, reason="hotfix: v2 crashes on empty input") == "3"
    assert champion(client) == "3"
    last = alias_history(client, NAME)[-1]
    assert (last["from"], last["to"], last["override"]) == ("2", "3", True)
    assert last["reason"] == "hotfix: v2 crashes on empty input"
    assert client.get_model_version(NAME, "3").tags["override"].endswith("hotfix: v2 crashes on empty input")


@pytest.mark.parametrize("to,message", [("9", "version 9 does not exist"), ("2", None)])
def test_missing_or_current_version(registry, to, message, capsys):
    params, client = registry
    if message:
        with pytest.raises(UserError, match=message):
            rollback.run(params, to)
    else:
        assert rollback.run(params, to) == "2"
        assert "already points at v2" in capsys.readouterr().out
    assert champion(client) == "2"
    assert len(alias_history(client, NAME)) == 1


def test_history_is_in_order(registry):
    params, client = registry
    rollback.run(params, "1")
    rollback.run(params, "2", reason="v1 was slower")
    events = alias_history(client, NAME)
    assert [(e["from"], e["to"]) for e in events] == [(None, "2"), ("2", "1"), ("1", "2")]
    assert events[-1]["reason"] == "v1 was slower"


def _add_version(client, tmp_path, verdict: str = "passed") -> str:
    mv = client.create_model_version(NAME, source=str(tmp_path / "model"))
    client.set_model_version_tag(NAME, mv.version, "gates", verdict)
    return str(mv.version)


def test_rollback_restores_the_previous_champion_not_a_version_rolled_back_from(registry, tmp_path):
    """v2 is rolled back to v1, then v4 is promoted: the next rollback must go to v1 (the previous champion), not v2."""
    from tasks.ops.registry import move_alias

    params, client = registry
    rollback.run(params, reason="v2 misclassifies http")
    v4 = _add_version(client, tmp_path)
    move_alias(client, NAME, "candidate", v4, "evaluated: gates passed; fp32", None, action="evaluate")
    move_champion(client, NAME, v4, "promoted: every gate passed (fp32)", "1")
    assert rollback.run(params) == "1"
    events = alias_history(client, NAME)
    assert [(e["alias"], e["from"], e["to"], e["action"]) for e in events] == [
        ("champion", None, "2", "promote"),
        ("champion", "2", "1", "rollback"),
        ("candidate", None, "4", "evaluate"),
        ("champion", "1", "4", "promote"),
        ("champion", "4", "1", "rollback"),
    ]
    assert [e["reason"] for e in events if e["action"] == "rollback"] == ["v2 misclassifies http", "rollback from v4"]
    assert all(e["user"] and e["time"] for e in events)
    assert alias_history(client, NAME, "candidate") == [events[2]]
    with pytest.raises(UserError, match="no gate-passing version older than v1"):
        rollback.run(params)  # v2 was rolled back from; nothing older than v1


def test_rollback_skips_an_earlier_champion_that_failed_its_gates(registry, tmp_path):
    """v3 (failed) was forced in over v2, then v4 promoted: rollback from v4 goes to v2, not the overridden v3."""
    params, client = registry
    rollback.run(params, "3", force=True, reason="hotfix")
    v4 = _add_version(client, tmp_path)
    move_champion(client, NAME, v4, "promoted: every gate passed (fp32)", "3")
    assert rollback.run(params) == "2"
    assert alias_history(client, NAME)[-1]["override"] is False


def test_records_written_before_aliases_were_named_read_as_champion_moves(registry, tmp_path):
    """Legacy `champion.history.<ns>` records (no alias, no action) are still read, in order with the new ones."""
    import json

    from typer.testing import CliRunner

    from tasks.ops.cli import app
    from tasks.ops.rollback import champion_stack

    params, client = registry
    legacy = {
        "time": "2024-01-01T00:00:00+00:00",
        "from": None,
        "to": "1",
        "reason": "promoted: every gate passed",
        "override": False,
        "user": "ci",
    }
    client.set_registered_model_tag(NAME, "champion.history.1", json.dumps(legacy))
    client.set_registered_model_tag(
        NAME, "champion.history.2", json.dumps({**legacy, "from": "1", "to": "2", "time": "2024-01-02T00:00:00+00:00"})
    )
    client.set_registered_model_tag(
        NAME,
        "champion.history.3",
        json.dumps(
            {**legacy, "from": "2", "to": "1", "reason": "rollback from v2", "time": "2024-01-03T00:00:00+00:00"}
        ),
    )
    events = alias_history(client, NAME)
    assert [(e["alias"], e["from"], e["to"]) for e in events] == [
        ("champion", None, "1"),
        ("champion", "1", "2"),
        ("champion", "2", "1"),
        ("champion", None, "2"),
    ]
    assert champion_stack(events[:3]) == ["1"]  # a legacy move to an older version is a rollback
    res = CliRunner().invoke(app, ["history"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines[0] == "2024-01-01T00:00:00+00:00  champion   v- -> v1  ci: promoted: every gate passed"
    assert len(lines) == 4 and all("  champion   " in line for line in lines)
