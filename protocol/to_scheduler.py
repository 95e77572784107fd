"""Messages the global scheduler receives.

From workers: RegisterWorker (→ RegisterReply), LoadReport, KvEvents (→ nothing, or ResyncKvEvents
when the scheduler lost track), Heartbeat, Deregister, MigrationResult.
From frontends and `kvferry ctl`: DispatchRequest (→ DispatchReply), StatusRequest
(→ StatusReply), MigrateRequestTo / DrainInstance / UndrainInstance (→ Ack).
From a worker pool manager (`kvferry up --scaling`): ScaleQuery (→ ScaleAdvice). Any request may
instead be answered by an ErrorReply.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from msgspec import Meta

from protocol.base import Message, RequestMessage
from protocol.common import Heartbeat, Ping
from protocol.fields import (
    MAX_REQUESTS_PER_INSTANCE,
    BlockHash,
    BlockHashes,
    Count,
    EpochMs,
    Id,
    IdList,
    InstanceRole,
    KvEventHashes,
    Name,
    NonNegInt,
    PositiveCount,
    Priority,
    Seq,
    Text,
)
from protocol.payloads import RequestLoadEntry, WorkerEndpoints

EngineKind = Literal["torch", "sim", "vllm"]


# ---- from workers --------------------------------------------------------------------------------

class RegisterWorker(RequestMessage, kw_only=True, frozen=True):
    """A worker announces itself (at start, and again after a scheduler restart: registering is idempotent)."""

    worker_id: Id
    endpoints: WorkerEndpoints
    host: Name
    engine: EngineKind
    model: Name
    total_blocks: PositiveCount
    block_size: PositiveCount
    kv_bytes_per_block: Count = 0  # migration only pairs workers with equal KV layouts
    max_running: Count | None = None  # the worker refuses new requests beyond this many
    pid: NonNegInt = 0
    # The namespace of its block hashes (protocol.kv_hash.namespace_hash): with block_size, what a
    # frontend hashes prompts with; 0: no prefix caching (it sends no KvEvents).
    kv_namespace: BlockHash = 0
    role: InstanceRole = "mixed"  # its configured role (prefill/decode disaggregation)


class LoadReport(Message, kw_only=True, frozen=True):
    """A worker's load after engine steps (rate-limited). The scheduler keeps the highest `seq`.

    Field names match policy.snapshot.InstanceLoad (instance_id = worker_id).
    """

    worker_id: Id
    seq: Seq
    sent_ms: EpochMs = 0
    total_blocks: Count
    free_blocks: Count
    num_running: Count
    num_waiting: Count
    num_preemptions: Count = 0  # cumulative
    head_of_line_blocks: Count = 0  # blocks the first queued request needs (0: none queued)
    queued_prefill_tokens: Count = 0  # prompt tokens still to prefill (waiting, and unfinished chunked prefills)
    num_cached_blocks: Count = 0  # blocks in its prefix cache (owned or not)
    requests: Annotated[list[RequestLoadEntry], Meta(max_length=MAX_REQUESTS_PER_INSTANCE)] = []
    draining: bool = False
    max_running: Count | None = None
    num_migrations_in: Count = 0
    num_migrations_out: Count = 0
    role: InstanceRole = "mixed"  # its role now (SetRole changes it)

    def __post_init__(self) -> None:
        if self.free_blocks > self.total_blocks:
            raise ValueError("free_blocks exceeds total_blocks")


class KvEvents(Message, kw_only=True, frozen=True):
    """The block hashes a worker's prefix cache stored and evicted since its previous KvEvents (net
    effects), sent with the load reports. `seq` counts a worker's KvEvents from 0, one by one, for
    as long as the process lives; the scheduler applies them in order and asks for a resync
    (ResyncKvEvents) when one is missing. `reset`: forget what this worker held, `stored` is (the
    start of) its whole cache; a batch too big for one message is split into consecutive ones,
    only the first with `reset`. A worker sends a reset after every registration."""

    worker_id: Id
    seq: Seq
    reset: bool = False
    stored: KvEventHashes = []
    removed: KvEventHashes = []


class Deregister(Message, kw_only=True, frozen=True):
    """A worker leaves on purpose (graceful stop): remove it from dispatch at once."""

    worker_id: Id
    reason: Text = ""


MigrationOutcome = Literal["committed", "aborted"]


class MigrationResult(Message, kw_only=True, frozen=True):
    """The source worker reports how a migration ended (metrics, ctl migrate feedback)."""

    migration_id: Id
    request_id: Id
    src_worker_id: Id
    dst_worker_id: Id
    outcome: MigrationOutcome
    reason: Text = ""  # abort reason: finished, preempted, no_room, timeout, cancelled, ...
    stages: Count = 0
    blocks: Count = 0
    bytes_moved: NonNegInt = 0
    downtime_ms: Annotated[float, Meta(ge=0.0, le=1e9)] = 0.0
    blocks_skipped: Count = 0  # blocks not sent: the destination's prefix cache held them


# ---- from frontends and ctl ----------------------------------------------------------------------

class DispatchRequest(RequestMessage, kw_only=True, frozen=True):
    """Where should this new (or resumed) request go? Answered by DispatchReply or ErrorReply(unavailable).

    The scheduler needs sizes, not tokens: it is never on the token path. `block_hashes`: the
    content hashes of the prompt's full blocks (protocol.kv_hash.prompt_hashes, the leading
    MAX_BLOCK_HASHES at most), computed with the hashing parameters `kv_namespace` and
    `kv_block_size` a DispatchReply announced; empty until the frontend knows them.
    """

    request_id: Id
    priority: Priority = 0
    num_prompt_tokens: PositiveCount
    max_tokens: PositiveCount = 16
    frontend_id: Id
    exclude_workers: IdList = []  # e.g. the worker that just failed this request
    block_hashes: BlockHashes = []
    kv_namespace: BlockHash = 0
    kv_block_size: Count = 0


class StatusRequest(RequestMessage, kw_only=True, frozen=True):
    """`kvferry ctl status`: every instance and, with `include_requests`, every request's location."""

    include_requests: bool = True


class MigrateRequestTo(RequestMessage, kw_only=True, frozen=True):
    """`kvferry ctl migrate REQUEST --to INSTANCE`. Answered by Ack once the migration is started."""

    request_id: Id
    dst_worker_id: Id


class SetInstanceRole(RequestMessage, kw_only=True, frozen=True):
    """`kvferry ctl role INSTANCE ROLE`: the instance serves in that role from now on. Answered by Ack."""

    worker_id: Id
    role: InstanceRole


class DrainInstance(RequestMessage, kw_only=True, frozen=True):
    """`kvferry ctl drain INSTANCE`: stop dispatching to it and migrate everything off it."""

    worker_id: Id


class UndrainInstance(RequestMessage, kw_only=True, frozen=True):
    """`kvferry ctl undrain INSTANCE`: make it eligible for dispatch again."""

    worker_id: Id


# ---- from a worker pool manager --------------------------------------------------------------------

class ScaleQuery(RequestMessage, kw_only=True, frozen=True):
    """A pool manager (the process that starts and stops workers, e.g. `kvferry up --scaling`) asks
    what to do; it polls a few times a second. `workers`: the ids of the workers it runs now
    (started and not yet stopped): those not registered yet count as starting, so the scheduler
    does not ask for a second one meanwhile. Answered by ScaleAdvice."""

    manager_id: Id
    workers: IdList = []


SchedulerInbound = Union[
    RegisterWorker, LoadReport, KvEvents, Heartbeat, Deregister, MigrationResult,
    DispatchRequest, StatusRequest, MigrateRequestTo, DrainInstance, UndrainInstance, ScaleQuery, SetInstanceRole,
    Ping,
]
"""Everything the scheduler's ROUTER socket accepts: pass as `allowed` to decode / sockets."""
