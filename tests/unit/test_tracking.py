"""MlflowTracker: a training loop never waits on the store, and no lost write goes unnoticed."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.shared.tracking import MlflowTracker, TrackingError


class Write:
    """What `mlflow.log_metrics(..., synchronous=False)` returns (RunOperations): `wait` blocks until the
    write landed and raises if it was lost."""

    def __init__(self, landed: threading.Event, lost: bool) -> None:
        self.landed, self.lost = landed, lost

    def wait(self) -> None:
        self.landed.wait()
        if self.lost:
            raise RuntimeError("API request to http://store/api/2.0/mlflow/runs/log-batch failed")


class Store:
    """Stands in for the `mlflow` module: writes land when the test says so."""

    def __init__(self) -> None:
        self.landed = threading.Event()
        self.lose = False

    def log_metrics(self, metrics, step=None, synchronous=True):
        return Write(self.landed, self.lose)

    def get_tracking_uri(self) -> str:
        return "http://store"


@pytest.fixture
def tracked() -> tuple[MlflowTracker, Store]:
    tracker, store = MlflowTracker("run"), Store()
    tracker._mlflow = store
    return tracker, store


def test_a_log_call_returns_while_the_store_is_still_writing(tracked):
    tracker, store = tracked
    start = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert time.perf_counter() - start < 1.0  # none of the 200 writes has landed yet
    store.landed.set()
    tracker.wait()


def test_a_lost_write_fails_the_next_log_call_and_wait_counts_them(tracked):
    tracker, store = tracked
    store.landed.set()
    tracker.log_metrics({"loss": 1.0}, step=0)
    store.lose = True
    tracker.log_metrics({"loss": 1.0}, step=1)
    deadline = time.monotonic() + 5
    with pytest.raises(TrackingError, match=r"MLflow tracking store http://store lost \d+ of \d+ asynchronous writes"):
        while time.monotonic() < deadline:  # the checker notices in the background; the loop goes on until then
            tracker.log_metrics({"loss": 1.0}, step=2)
            time.sleep(0.01)
    with pytest.raises(TrackingError, match="log-batch failed"):
        tracker.wait()
