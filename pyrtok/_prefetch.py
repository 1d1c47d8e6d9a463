"""Batches made one step ahead in a worker process: the next step's data is built while this step computes.

A training step asks for its batch as a request (the keyword arguments of a picklable, deterministic function)
and names the request of the step after it. With a worker, that next request is submitted at once and its
result is waiting when the next step asks for it; a request that was not submitted ahead (the first step of an
invocation, or after a change of plan) is made in this process. The batches are the same either way: only where
they are made changes, so a run resumed with or without a worker is the run it would have been.

The worker is spawned (not forked: a forked child of a process that has started OpenMP threads may hang), uses
one thread at the lowest priority (``nice`` 19, so that it takes what the training threads leave idle), and
ignores SIGINT and SIGTERM: a launcher or a scheduler that signals the whole process group asks the training
loop to stop (it finishes its step and saves a checkpoint), and the worker ends with the loop. A worker that
dies all the same is not fatal: the batch it owed is built in this process, and so are the rest.

It pays where a core is free while a step computes (a GPU run, or more cores than training threads); on a CPU
whose cores the training threads already fill it competes with them (``benchmarks/bench_train_data.py``
measures both ways).

Example:
    >>> with Prefetcher(dict, workers=0) as batches:
    ...     batches({"first": 7}, upcoming={"first": 9})
    {'first': 7}
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")


def _quiet_worker() -> None:
    """Worker initializer: one thread at the lowest priority, and leave SIGINT / SIGTERM to the parent."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)
    os.nice(19)


class Prefetcher(Generic[T]):
    """Call ``make(**request)`` for a sequence of requests, one request ahead in a worker (a context manager).

    Args:
        make: a module-level (picklable) function whose result depends on its arguments alone.
        workers: 0 makes every batch in this process; 1 makes the upcoming one in a spawned worker process.
    """

    def __init__(self, make: Callable[..., T], workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers not in (0, 1):
            raise ValueError(f"workers must be 0 (make batches in this process) or 1 (one worker), got {workers!r}")
        self.make = make
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._pending: tuple[dict[str, Any], Future] | None = None
        self.ahead = 0  # how many requests were answered by the worker (for tests and logs)

    def __enter__(self) -> Prefetcher[T]:
        if self.workers:
            self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_quiet_worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop what is pending and end the worker."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __call__(self, request: Mapping[str, Any], upcoming: Mapping[str, Any] | None = None) -> T:
        """``make(**request)``, taken from the worker when it was the previous call's ``upcoming``; then
        ``upcoming`` (the next call's request, or None at the end) is handed to the worker."""
        request = dict(request)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] == request:
            try:
                result = pending[1].result()
                self.ahead += 1
            except BrokenProcessPool:  # the worker died (a signal it could not ignore): go on without it
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                result = self.make(**request)
        else:
            if pending is not None:
                pending[1].cancel()
            result = self.make(**request)
        if upcoming is not None and self._pool is not None:
            upcoming = dict(upcoming)
            self._pending = (upcoming, self._pool.submit(self.make, **upcoming))
        return result
