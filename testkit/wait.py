"""One bounded wait: `until` (async) and `wait_until` (sync) poll a predicate until it holds or a
deadline passes, then raise WaitTimeout naming what was awaited and for how long. Never a bare
sleep as the assertion: every wait ends at its deadline.

The predicate's truthy value is returned, so `assert await until(...)` and
`reply = await until(lambda: ... and reply)` both read naturally. `what` may be a callable, to
describe the state at the timeout (the last reply, the messages so far)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any

Description = str | Callable[[], str]
EVENT_RECHECK_S = 0.2  # with `changed`: re-check this often even if nothing signals


class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait ran out (an AssertionError for tests, a TimeoutError for everything else)."""


def _timeout(what: Description, timeout_s: float) -> WaitTimeout:
    text = what() if callable(what) else what
    return WaitTimeout(f"timed out after {timeout_s:g} s waiting for {text or 'the condition'}")


async def until(pred: Callable[[], Any], timeout_s: float, what: Description = "", step_s: float = 0.01, *,
                changed: asyncio.Event | None = None) -> Any:
    """Until `pred()` is truthy (a coroutine function's result is awaited); its value.

    Re-checks every `step_s`, or, with `changed`, whenever that event is set (and at least every
    EVENT_RECHECK_S). An exception from `pred` propagates at once."""
    deadline = time.monotonic() + timeout_s
    while True:
        if changed is not None:
            changed.clear()
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(what, timeout_s)
        if changed is None:
            await asyncio.sleep(min(step_s, left))
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, max(step_s, EVENT_RECHECK_S)))


def wait_until(pred: Callable[[], Any], timeout_s: float, what: Description = "", step_s: float = 0.01) -> Any:
    """`until` for synchronous code: polls `pred()` every `step_s`; its truthy value."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = pred()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise _timeout(what, timeout_s)
        time.sleep(min(step_s, left))
