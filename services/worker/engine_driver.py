"""Runs an engine on its own thread so that engine steps never block the worker's socket I/O.

Every engine call happens on that thread: commands (add, abort, migration reads/writes, stats)
are queued from the asyncio loop and run between two steps, in order; step outputs are handed
back to the loop with `call_soon_threadsafe`.

A step that raises fails the requests it was running (aborted in the engine, reported as outputs
with finish_reason "error"), so a failing request cannot make every later step fail too.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
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

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout_s)

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 10.0) -> T:
        """Run `fn(engine)` on the engine thread between steps; its exception propagates here."""
        fut: asyncio.Future[T] = self._loop.create_future()
        self._commands.put((fn, fut))
        return await asyncio.wait_for(fut, timeout_s)

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
                self._apply(*item)
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - the batch's requests fail, the driver keeps going
                failed = self._fail_running(exc)
                if self._on_step_error is not None:
                    self._loop.call_soon_threadsafe(self._on_step_error, exc, context=self._context)
                if failed:
                    self._loop.call_soon_threadsafe(self._on_outputs, failed, context=self._context)
                continue
            self.steps += 1
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs, context=self._context)

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
