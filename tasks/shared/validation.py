"""The validation-result format: what validate writes and what every later consumer checks.

`paths.validation` is one JSON file, deterministic for the same data, suites and thresholds (no
timestamps, no run ids), so downstream stages depend on it without going stale when validate
reruns on unchanged data. The Data Docs HTML lies elsewhere (`paths.data_docs`) and nothing depends on it.

    {"success": bool, "evaluated": int,
     "failed": ["<table>: <expectation>(<args>): <offending rows or observation>", ...],
     "suite_parameters": {...}, "suites": {"<table>": {"success": bool, "results": [...]}}}

with one suite per table of the Great Expectations project (`paths.gx`; see tasks/validate.py). The
helpers that open the project's checkpoints and turn GE's results into those records and one-line failures
live here too, for every stage that runs a checkpoint (validate, kg_data).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tasks.shared.errors import UserError
from tasks.shared.io import write_json

SAMPLES = 3
"""Offending rows named per failed expectation in the error line."""
RESULT_KEYS = (
    "observed_value",
    "details",
    "element_count",
    "missing_count",
    "unexpected_count",
    "unexpected_percent",
    "partial_unexpected_list",
    "partial_unexpected_index_list",
    "partial_missing_list",
)
"""What a result record keeps of GE's result: values, no run ids or timestamps."""


def _short(value, n: int = 40) -> str:
    s = repr(value) if isinstance(value, str) else f"{value:.4g}" if isinstance(value, float) else str(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def _error(r) -> str | None:
    """The message of an exception GE caught while evaluating `r` (a flat dict, or one per metric), if any."""
    info = r.exception_info or {}
    for item in [info] if "raised_exception" in info else info.values():
        if isinstance(item, dict) and item.get("raised_exception"):
            message = str(item.get("exception_message") or "").strip().removeprefix("Error: ")
            return (message.splitlines() or ["(no message)"])[0][:120]
    return None


def _bounds(kw: dict) -> str | None:
    lo, hi = kw.get("min_value"), kw.get("max_value")
    if lo is None and hi is None:
        return None
    return (
        f"{_short(lo)}..{_short(hi)}"
        if lo is not None and hi is not None
        else f">={_short(lo)}"
        if lo is not None
        else f"<={_short(hi)}"
    )


def describe_failure(table: str, r) -> str:
    """One failed expectation: its type and arguments, then the offending rows (id=value) or what GE observed."""
    kw = r.expectation_config.kwargs
    column = kw.get("column")
    args = [
        a
        for a in (column, _bounds(kw), f"mostly={kw['mostly']:.4g}" if kw.get("mostly", 1) != 1 else None)
        if a is not None
    ]
    res = r.result or {}
    mismatched = (res.get("details") or {}).get("mismatched") or {}
    if (error := _error(r)) is not None:
        detail = f"error: {error}"
    elif res.get("unexpected_count"):
        rows = [
            str(row.get("id")) + (f"={_short(row[column])}" if column in row and column != "id" else "")
            for row in res.get("partial_unexpected_index_list") or []
        ]
        sample = ", ".join(rows[:SAMPLES]) or ", ".join(
            _short(v) for v in (res.get("partial_unexpected_list") or [])[:SAMPLES]
        )
        detail = f"{res['unexpected_count']} of {res.get('element_count', '?')} rows, e.g. {sample}"
    elif mismatched:
        detail = ", ".join(f"{k} {sorted(v)}" for k, v in sorted(mismatched.items()) if v)
    elif res.get("partial_missing_list"):
        detail = f"missing {sorted(res['partial_missing_list'])[:10]}"
    else:
        detail = f"observed {_short(res.get('observed_value'), 80)}"
    return f"{table}: {r.expectation_config.type}({', '.join(args)}): {detail}"


def record(r) -> dict:
    """One expectation's outcome, deterministic for the same data (GE's own JSON carries fresh ids and times)."""
    cfg = r.expectation_config
    res = r.result or {}
    record = {
        "expectation": cfg.type,
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "batch_id"},
        "success": bool(r.success),
        "result": {k: res[k] for k in RESULT_KEYS if k in res},
    }
    if (error := _error(r)) is not None:
        record["error"] = error
    return json.loads(json.dumps(record, default=str))


def open_checkpoints(src: Path, work: Path, names) -> dict:
    """The checkpoints `names`, by name, of a File Data Context on a copy of the GE project `src` made at `work`
    (GE writes into its project as it runs: the tracked files stay untouched)."""
    import great_expectations as gx

    if not (Path(src) / "great_expectations.yml").is_file():
        raise UserError(f"{src}: not a Great Expectations project (no great_expectations.yml; paths.gx in params.yaml)")
    shutil.copytree(src, work, ignore=shutil.ignore_patterns("uncommitted", ".ge_store_backend_id"))
    try:
        ctx = gx.get_context(mode="file", context_root_dir=work)
        return {name: ctx.checkpoints.get(name) for name in names}
    except Exception as e:  # noqa: BLE001 - a hand-edited suite, definition or checkpoint that GE cannot load
        raise UserError(
            f"{src}: cannot load the Great Expectations project ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


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
