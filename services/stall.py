"""Noticing that this process itself stopped running for a while (CPU starvation, a VM's stolen
time, a long GC pause): a periodic task that woke up much later than it asked to.

Liveness checks measure other processes' silence by this process's clock. Time during which this
process was not running is not their silence: their heartbeats and Pongs are queued, unread, in our
sockets. Without this, a frontend or scheduler stalled for longer than its timeout declares every
worker lost on its first tick back and, in the frontend's case, fails or resumes every stream.
"""

from __future__ import annotations

import time


class StallWatch:
    """The lateness of a loop that sleeps `interval_s` between rounds.

    `late(now)`, called once per round, returns how many seconds beyond `interval_s` passed since the
    previous round, when that is at least `min_stall_s` (smaller delays are ordinary scheduling
    noise), else 0."""

    def __init__(self, interval_s: float, min_stall_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.min_stall_s = min_stall_s
        self._last: float | None = None

    def late(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        last, self._last = self._last, now
        if last is None:
            return 0.0
        lag = now - last - self.interval_s
        return lag if lag >= self.min_stall_s else 0.0
