"""The contract between a worker and the engine it runs: what services may call.

Every engine a worker runs (the torch `LLMEngine`, its sim-executor form, and `VllmEngine`)
implements `Engine`. Services reach an engine only through these methods, always on the engine
thread (`services.worker.engine_driver.EngineDriver.call`); an engine's scheduler, block manager,
reservations and detached table stay its own business.

Migration (design §5) in engine calls: the destination `reserve`s blocks under a key, the source
copies `read_blocks` → `write_blocks` by `block_table`, `detach_request`s the request for the last
stage and hands its state to the destination's `commit_request`; `release` frees what a side
holds (a source's detached request, a destination's reservation), `reattach_request` undoes a
detach when the migration is aborted.

KV events (design §4) are optional: an engine with a prefix cache that reports its changes also
implements `KvEventSource`; `kv_event_source(engine)` is how services ask (None for the others,
e.g. the vLLM engine, or prefix caching off: such a worker announces namespace 0, sends no events).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from engine.block_manager import KvEventBatch
    from engine.engine import EngineStats
    from engine.request import MigrationView, RequestOutput, SamplingParams
    from protocol.payloads import MigratableState


@runtime_checkable
class Engine(Protocol):
    """An engine a worker runs: requests in, one batch step at a time, KV blocks that can move."""

    # ---- requests and steps ----
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: "SamplingParams | None" = None,
                    priority: int = 0, cache_salt: str = "") -> Any: ...

    def abort_request(self, request_id: str) -> "RequestOutput | None": ...

    def step(self) -> "list[RequestOutput]": ...

    def has_unfinished_requests(self) -> bool: ...

    # ---- load ----
    def stats(self, per_request: bool = False) -> "EngineStats": ...

    def num_waiting(self) -> int:
        """Requests queued and not yet running (the worker's admission limit)."""
        ...

    def check_integrity(self) -> None: ...

    # ---- KV blocks ----
    @property
    def kv_tensor(self) -> "torch.Tensor | None":
        """The KV cache the data paths read and write (None: the sim executor has no KV data)."""
        ...

    @property
    def kv_layout(self) -> str:
        """Names the cache's layout; migration needs both ends to agree."""
        ...

    def block_table(self, request_id: str) -> list[int]: ...

    def read_blocks(self, block_ids: list[int]) -> "torch.Tensor": ...

    def write_blocks(self, block_ids: list[int], blocks: "torch.Tensor") -> None: ...

    # ---- migration ----
    def migration_view(self, request_id: str) -> "MigrationView | None": ...

    def reserve(self, key: str, num_blocks: int) -> list[int]: ...

    def is_reserved(self, key: str) -> bool:
        """`key` holds a reservation (a destination's, not yet committed or released)."""
        ...

    def commit_request(self, state: MigratableState, reservation: str | None) -> Any: ...

    def detach_request(self, request_id: str) -> MigratableState: ...

    def is_detached(self, request_id: str) -> bool:
        """The request is out of the batch with its blocks kept (a migration's last stage)."""
        ...

    def reattach_request(self, request_id: str) -> None: ...

    def release(self, key: str) -> int: ...


@runtime_checkable
class KvEventSource(Protocol):
    """An engine whose prefix cache reports the block hashes it stores and evicts."""

    @property
    def kv_namespace(self) -> int:
        """The namespace of its block hashes (protocol.kv_hash); 0: no prefix caching."""
        ...

    def enable_kv_events(self) -> None:
        """Start recording; the first `take_kv_events` is a reset with the whole cache."""
        ...

    def take_kv_events(self, resync: bool = False) -> "KvEventBatch":
        """The net changes since the last call; with `resync`, a reset with the whole cache."""
        ...


def kv_event_source(engine: object) -> KvEventSource | None:
    """`engine` as a KvEventSource when it caches prefixes and reports them; None otherwise."""
    if isinstance(engine, KvEventSource) and engine.kv_namespace:
        return engine
    return None
