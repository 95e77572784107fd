"""The threads that move KV blocks for migrations, in two classes.

Pre-copy runs while the request keeps decoding, so its copies must not take CPU from the engine
thread: they run on `background` threads at the lowest CPU priority (nice 19 by default; Linux
applies setpriority to one thread when given its thread id). The last stage runs while the
request is out of every batch, so its copies run on an `urgent` thread at normal priority.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading


def _lower_priority(nice: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class CopyThreads:
    """`pool(urgent)`: the executor for a copy of the last stage (urgent) or of pre-copy."""

    def __init__(self, background_nice: int = 19) -> None:
        self.background = concurrent.futures.ThreadPoolExecutor(
            2, thread_name_prefix="kv-precopy", initializer=_lower_priority, initargs=(background_nice,))
        self.urgent = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-final")

    def pool(self, urgent: bool) -> concurrent.futures.Executor:
        return self.urgent if urgent else self.background

    def shutdown(self) -> None:
        self.background.shutdown(wait=True)
        self.urgent.shutdown(wait=True)
