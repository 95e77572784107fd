"""Runs an engine on its own thread so that engine steps never block the worker's socket I/O.

Every engine call happens on that thread: commands (add, abort, migration reads/writes, stats)
are queued from the asyncio loop and run between two steps, in order; step outputs are handed
back to the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.request import RequestOutput

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
            except Exception as exc:  # noqa: BLE001 - reported to the worker, which fails the batch's requests
                if self._on_step_error is not None:
                    self._loop.call_soon_threadsafe(self._on_step_error, exc)
                continue
            self.steps += 1
            if outputs:
                self._loop.call_soon_threadsafe(self._on_outputs, outputs)

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
