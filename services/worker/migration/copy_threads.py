"""The threads that move KV blocks for migrations, in two classes.

Pre-copy runs while the request keeps decoding, so its copies must not take CPU from the engine
thread: they run on `background` threads at the lowest CPU priority (nice 19 by default). The last
stage runs while the request is out of every batch, so its copies run on an `urgent` thread at
normal priority. Each copy gets a thread of its own that exits when it is done: a long-lived
thread that ran torch copies would keep an OpenMP team alive and slow every engine step after the
migration (services.worker.torch_threads).
"""

from __future__ import annotations

import concurrent.futures

from services.worker.torch_threads import FreshThreadExecutor


class CopyThreads:
    """`pool(urgent)`: the executor for a copy of the last stage (urgent) or of pre-copy."""

    def __init__(self, background_nice: int = 19) -> None:
        self.background = FreshThreadExecutor(2, "kv-precopy", nice=background_nice)
        self.urgent = FreshThreadExecutor(1, "kv-final")

    def pool(self, urgent: bool) -> concurrent.futures.Executor:
        return self.urgent if urgent else self.background

    def shutdown(self) -> None:
        self.background.shutdown(wait=True)
        self.urgent.shutdown(wait=True)
