"""What the worker's parts need of the worker, and nothing more.

The control handler, both migration roles, the migration service and the metrics collector get a
`WorkerContext` instead of the `Worker`: its identity, settings and engine facts, the engine
driver (the only way to reach the engine, on its thread), the route table, the token streamer, the
scheduler link, and the two lifecycle flags. The Worker builds it once and keeps owning the
lifecycle (start, drain, stop); nothing under `services/worker/` but `worker.py` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from services.config import WorkerConfig
    from services.worker.engine_driver import EngineDriver
    from services.worker.engine_factory import EngineInfo
    from services.worker.scheduler_link import SchedulerLink
    from services.worker.streams import RouteTable, TokenStreamer


@dataclass
class WorkerState:
    """The worker's lifecycle flags, set by the Worker and read by its parts."""

    draining: bool = False  # takes no new requests; the scheduler moves the running ones away
    stopping: bool = False  # shutting down: refuses everything
    role: str = "mixed"  # prefill | decode | mixed (services/worker/handoff.py)
    decode_target: tuple[str, str] | None = None  # a prefill worker's (worker id, migration endpoint) to hand off to


@dataclass(frozen=True)
class WorkerContext:
    """The narrow view of one worker its parts are built with (see the module docstring)."""

    worker_id: str
    cfg: "WorkerConfig"
    info: "EngineInfo"
    control_endpoint: str
    kv_tensor: "torch.Tensor | None"  # the engine's KV cache (None: a sim engine holds no KV data)
    driver: "EngineDriver"
    routes: "RouteTable"
    streamer: "TokenStreamer"
    link: "SchedulerLink"
    state: WorkerState

    @property
    def draining(self) -> bool:
        return self.state.draining

    @property
    def stopping(self) -> bool:
        return self.state.stopping
