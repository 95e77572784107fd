"""Threads that run torch work in a worker without slowing the engine thread's steps.

Every OS thread that runs a parallel torch op becomes the master of its own OpenMP team, and
libgomp keeps that team's threads for as long as the master thread lives. Once a process holds
more OpenMP threads than CPUs, libgomp switches every team to "throttled" waiting: a worker
thread spins ~100 times instead of ~300,000 between two parallel regions, then sleeps on a futex.
A decode step is hundreds of small parallel regions, each now paying a futex wake-up: measured on
2 cores with SmolLM2 bf16 at batch 16, a step took 33 ms with the engine thread's team alone and
52-54 ms once one other live thread had run a single parallel op (the worker built its engine on
asyncio's default executor, whose thread stays alive: served decode ran 1.65x slower than the
same engine in process).

So torch work off the engine thread runs on a thread of its own that exits when the work is done,
taking its OpenMP team with it: the engine build, and the migration copies
(`FreshThreadExecutor`). A migration's copies still overlap the engine's steps while they run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def _lower_priority(nice: int) -> None:
    # Linux applies setpriority to one thread when given its thread id.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class FreshThreadExecutor(concurrent.futures.Executor):
    """Runs each submitted call on a new thread that exits afterwards (see the module docstring),
    at most `max_workers` at a time (the others' threads wait for a slot); `nice` lowers each thread's
    CPU priority (Linux)."""

    def __init__(self, max_workers: int, name: str, nice: int | None = None) -> None:
        self._slots = threading.BoundedSemaphore(max_workers)
        self._name = name
        self._nice = nice
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        self._count = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            self._count += 1
            thread = threading.Thread(target=self._run, args=(fut, fn, args, kwargs),
                                      name=f"{self._name}-{self._count}", daemon=True)
            self._threads.add(thread)
        thread.start()
        return fut

    def _run(self, fut: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> None:
        try:
            with self._slots:
                if not fut.set_running_or_notify_cancel():
                    return
                if self._nice is not None:
                    _lower_priority(self._nice)
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if wait:
            for t in threads:
                t.join()


async def on_fresh_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a new thread that exits when it returns (its exception propagates here)."""
    executor = FreshThreadExecutor(1, getattr(fn, "__name__", "torch-work"))
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        executor.shutdown(wait=False)
