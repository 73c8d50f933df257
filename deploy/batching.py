"""Adaptive batching of calls that carry settings besides their items (/search's k and mode, /embed's kind), for
both front ends (REST deploy/service.py, gRPC deploy/grpc_server.py).

BentoML's adaptive batching (`@bentoml.api(batchable=True)`) merges concurrent requests into one call only for an
API with exactly one parameter (its documentation: "the batchable API endpoint accepts only one parameter in
addition to bentoml.Context"; several parameters need a composite input and a second Service in front). /search
(`query`, `k`, `mode`) and /embed (`texts`, `kind`) keep their one-request contract and are batched here instead:
one worker thread runs the calls; whatever arrived while it was busy, with the same settings, runs next as one
batch (one forward pass of the encoder). A lone request never waits for company, so batching adds no latency at
low load and grows the batches as load grows, as BentoML's dispatcher does.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable


@dataclass
class _Call:
    key: Hashable
    items: list
    done: Future


class Batcher:
    """Runs `run(key, items) -> results` (one result per item, in order) on one thread, merging the calls queued
    meanwhile that share a key, up to `max_items` items per run; thread-safe, usable from threads and asyncio
    (`asyncio.wrap_future(batcher.submit(...))`)."""

    def __init__(self, run: Callable[[Hashable, list], list], max_items: int, name: str = "lmforge-batcher") -> None:
        self.run, self.max_items = run, max_items
        self.batches, self.batched_items = 0, 0
        """Runs made and items they carried (their ratio is the mean batch size)."""
        self._queue: deque[_Call] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, items: list) -> Future:
        """A future of `items`' results (or of the exception `run` raised for the batch they were in)."""
        done: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(_Call(key, list(items), done))
            self._ready.notify()
        return done

    def close(self) -> None:
        """Finish the calls queued, then stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Call] | None:
        """The oldest call and every later one with its key that fits in max_items (None: closed and drained)."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch, size, rest = [first], len(first.items), deque()
            while self._queue:
                call = self._queue.popleft()
                if call.key == first.key and size + len(call.items) <= self.max_items:
                    batch.append(call)
                    size += len(call.items)
                else:
                    rest.append(call)
            self._queue = rest
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            items = [x for call in batch for x in call.items]
            try:
                results = self.run(batch[0].key, items)
            except Exception as e:  # every caller of the batch gets the error, and the worker goes on
                for call in batch:
                    call.done.set_exception(e)
                continue
            self.batches, self.batched_items = self.batches + 1, self.batched_items + len(items)
            start = 0
            for call in batch:
                call.done.set_result(results[start : start + len(call.items)])
                start += len(call.items)
