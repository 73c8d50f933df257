"""Retry policy of the Prefect flow's stage tasks."""

from __future__ import annotations

import pytest

from flows.stages import StageFailed, worth_retrying
from tasks.shared.stagerun import RESUMABLE


class FinalState:
    name = "Failed"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self, raise_on_failure: bool = True):
        return self.exc


@pytest.mark.parametrize(
    "exc,retry",
    [
        (StageFailed("bad params", 2), False),  # a user error: the same input fails again
        (StageFailed("killed", -9), True),  # a killed worker: the stage resumes from its checkpoint
        (StageFailed("crash", 1), True),
        (RuntimeError("lost connection"), True),
    ],
)
def test_only_crashes_are_retried(exc, retry):
    assert worth_retrying(None, None, FinalState(exc)) is retry


def test_pretrain_is_the_resumable_stage():
    assert RESUMABLE.get("pretrain", 0) >= 1 and "ingest" not in RESUMABLE
