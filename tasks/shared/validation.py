"""The validation-result format: what validate writes and what every later consumer checks.

`paths.validation` is one JSON file, deterministic for the same data, suites and thresholds (no
timestamps, no run ids), so downstream stages depend on it without going stale when validate
reruns on unchanged data. The Data Docs HTML lies elsewhere (`paths.data_docs`) and nothing depends on it.

    {"success": bool, "evaluated": int,
     "failed": ["<table>: <expectation>(<args>): <offending rows or observation>", ...],
     "suite_parameters": {...}, "suites": {"<table>": {"success": bool, "results": [...]}}}

with one suite per table of the Great Expectations project (`paths.gx`; see tasks/validate.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.shared.errors import UserError
from tasks.shared.io import write_json


def write_result(path: Path | str, result: dict) -> None:
    """Write a validation result atomically (keys sorted, so equal results are equal bytes)."""
    if not isinstance(result.get("success"), bool):
        raise ValueError("a validation result needs a boolean `success`")
    write_json(path, result)


def read_result(path: Path | str) -> dict:
    """The validation result at `path`; missing or unreadable is a UserError naming it."""
    f = Path(path)
    try:
        result = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{f}: no validation result (run the validate stage first)") from None
    if not isinstance(result, dict) or not isinstance(result.get("success"), bool):
        raise UserError(f"{f}: not a validation result (no boolean `success`)")
    return result


def require_passed(path: Path | str) -> None:
    """Stop a downstream stage unless the validation result at `path` passed."""
    if not read_result(path)["success"]:
        raise UserError(f"{path}: data validation failed; fix the data before training")
