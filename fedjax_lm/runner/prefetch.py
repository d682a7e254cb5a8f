"""Rounds fed ahead: round r + 1's cohort is drawn and packed on a background thread while
round r runs, so the device does not wait for the host.

A round's data is a pure function of (config, round) — the cohort comes from the round's key
and the batches from (seed, round, client) — so packing it early or late gives the same arrays,
and a run is bitwise identical with and without prefetch. What the main thread still waits for
is measured per round (`host_wait_s`): the whole packing time without prefetch, only what the
previous round did not hide with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")


class RoundFeeder(Generic[T]):
    """`for r, item, wait_s in feeder.rounds(start, stop)`: `item = make(r)`, made one round
    ahead on a worker thread when `ahead`; `wait_s` is how long the caller waited for it."""

    def __init__(self, make: Callable[[int], T], *, ahead: bool = True) -> None:
        self._make = make
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="round-feeder") if ahead else None

    def rounds(self, start: int, stop: int) -> Iterator[tuple[int, T, float]]:
        pending: Future[T] | None = None
        for r in range(start, stop):
            t0 = time.perf_counter()
            item = pending.result() if pending is not None else self._make(r)
            wait_s = time.perf_counter() - t0
            pending = (self._pool.submit(self._make, r + 1)
                       if self._pool is not None and r + 1 < stop else None)
            yield r, item, wait_s

    def close(self) -> None:
        """Stop the worker (a round made ahead and never used is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RoundFeeder[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
