"""Runs an engine on its own thread so that engine steps never block the worker's socket I/O.

Every engine call happens on that thread: commands (add, abort, migration reads/writes, stats)
are queued from the asyncio loop and run between two steps, in order; step outputs are handed
back to the loop with `call_soon_threadsafe`.

A step that raises fails the requests it was running (aborted in the engine, reported as outputs
with finish_reason "error"), so a failing request cannot make every later step fail too. A step
or command that never returns (a deadlock, a hung device call) cannot be interrupted from Python:
`busy_s()` tells how long the current one has run, so the worker's watchdog can report the
process unhealthy and have it restarted (services.sd_notify).

Test hook: with KVFERRY_TEST_ENGINE_HANG_FILE set, the first engine step that finds that file
removes it and then blocks forever (exactly one hang across processes: the removal is atomic).
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.request import FinishReason, RequestOutput, RequestStatus

T = TypeVar("T")

_STOP = object()


class EngineDriver:
    """Owns an LLMEngine and its step thread."""

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop,
                 on_outputs: Callable[[list[RequestOutput]], None],
                 on_step_error: Callable[[BaseException], None] | None = None,
                 idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self._loop = loop
        # Callbacks run on the loop in the creator's context (structlog's bound service/pid, ...),
        # not in the engine thread's empty one.
        self._context = contextvars.copy_context()
        self._on_outputs = on_outputs
        self._on_step_error = on_step_error
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self.steps = 0
        self._busy_since: float | None = None  # monotonic start of the step or command running now
        self._hang_file = os.environ.get("KVFERRY_TEST_ENGINE_HANG_FILE", "")

    def busy_s(self, now: float | None = None) -> float:
        """Seconds the engine thread has spent in its current step or command (0 when between)."""
        since = self._busy_since
        return 0.0 if since is None else max(0.0, (time.monotonic() if now is None else now) - since)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout_s)

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 10.0) -> T:
        """Run `fn(engine)` on the engine thread between steps; its exception propagates here."""
        fut: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, fut))
        async with asyncio.timeout(timeout_s):  # not wait_for: in 3.11 it can swallow a cancellation
            return await fut

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished_requests()
            try:
                item = self._commands.get(timeout=self._idle_wait_s) if block else self._commands.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    return
                self._busy_since = time.monotonic()
                self._apply(*item)
                self._busy_since = None
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = None
            if not self.engine.has_unfinished_requests():
                continue
            self._busy_since = time.monotonic()
            try:
                if self._hang_file:
                    self._test_hang()
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the driver keeps going
                self._busy_since = None
                failed = self._fail_running(exc)
                if self._on_step_error is not None:
                    self._loop.call_soon_threadsafe(self._on_step_error, exc, context=self._context)
                if failed:
                    self._loop.call_soon_threadsafe(self._on_outputs, failed, context=self._context)
                continue
            self._busy_since = None
            self.steps += 1
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs, context=self._context)

    def _test_hang(self) -> None:
        try:
            os.remove(self._hang_file)
        except OSError:
            return  # no file (or another process took it): step as usual
        threading.Event().wait()  # a stuck step: only the watchdog gets this process out

    def _fail_running(self, exc: BaseException) -> list[RequestOutput]:
        """Abort every running request (the batch that failed) and return their error outputs."""
        message = f"engine step failed: {type(exc).__name__}: {exc}"[:4000]
        failed: list[RequestOutput] = []
        for rid, req in list(self.engine.requests.items()):
            if req.status is not RequestStatus.RUNNING:
                continue
            num_out = req.num_output_tokens
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - the engine is already in trouble; drop it from the registry
                self.engine.requests.pop(rid, None)
            failed.append(RequestOutput(rid, [], num_out, finished=True, finish_reason=FinishReason.ERROR,
                                        error=message))
        return failed

    def _apply(self, fn: Callable[[LLMEngine], Any], fut: asyncio.Future[Any]) -> None:
        try:
            result = fn(self.engine)
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            self._loop.call_soon_threadsafe(_settle, fut, None, exc)
        else:
            self._loop.call_soon_threadsafe(_settle, fut, result, None)


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the caller timed out and went away
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)
