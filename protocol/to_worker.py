"""Messages a worker receives.

On its control socket (WorkerControlInbound):
- from frontends: AddRequest (→ Ack, or ErrorReply overloaded/refused), AbortRequest (→ Ack), Heartbeat;
- from the scheduler: MigrateCommand, CancelMigration, Drain, Shutdown (→ Ack), Ping (→ Pong).

On its DEALER to the scheduler (WorkerSchedulerReplies): RegisterReply, Ack, Pong, ErrorReply, and
ResyncKvEvents (the scheduler lost track of its KvEvents).

On its migration socket, as destination (WorkerMigrationInbound), from the source worker:
MigrateReserve (→ ReserveReply), MigrateBlocks + tensor frames (→ BlocksAck), MigrateCommit
(→ CommitAck), MigrateAbort (one-way). The source receives the replies (WorkerMigrationReplies).

A migration, design §5: reserve (stage 0) → blocks → [reserve more → blocks]* → commit → CommitAck;
the source frees its blocks only after a positive CommitAck. Either side may send MigrateAbort;
a destination frees reservations that nobody commits after a timeout.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from protocol.base import Message, ReplyMessage, RequestMessage
from protocol.common import Ack, ErrorReply, Heartbeat, Ping, Pong
from protocol.fields import (
    InstanceRole,
    MAX_PROMPT_TOKENS,
    MAX_TENSORS,
    BlockIds,
    Count,
    Endpoint,
    Id,
    CacheSalt,
    Incarnation,
    Name,
    NonNegInt,
    PositiveCount,
    Priority,
    Text,
    TokenId,
    TokenIds,
)
from protocol.payloads import MigratableState, SamplingParams, TensorSpec

# ---- from frontends ------------------------------------------------------------------------------


class AddRequest(RequestMessage, kw_only=True, frozen=True):
    """Start generating for a request; tokens stream as TokenBatch to `reply_address`.

    `first_index` is the output index of the first token this worker will produce: 0 for a new
    request; when a request is resumed after a worker failure, the frontend sends prompt + tokens
    already delivered as the prompt, and `first_index` = how many it delivered.
    """

    request_id: Id
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)]
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    priority: Priority = 0
    frontend_id: Id
    reply_address: Endpoint
    first_index: Count = 0
    frontend_incarnation: Incarnation = ""  # Heartbeat.incarnation of the frontend that sent it
    cache_salt: CacheSalt = ""  # shares cached KV only with requests of the same salt (a tenant's)


class AbortRequest(RequestMessage, kw_only=True, frozen=True):
    """Stop a request and free its blocks (client disconnect, cancel). Ack(ok=False): not here."""

    request_id: Id
    reason: Text = ""


# ---- from the scheduler --------------------------------------------------------------------------

class RegisterReply(ReplyMessage, kw_only=True, frozen=True):
    """Scheduler → worker, answer to RegisterWorker: the intervals the worker should keep."""

    accepted: bool = True
    scheduler_id: Id
    heartbeat_interval_ms: PositiveCount = 500
    report_interval_ms: PositiveCount = 50
    reason: Text = ""


class ResyncKvEvents(Message, kw_only=True, frozen=True):
    """Scheduler → worker, on the worker's DEALER (an answer to a KvEvents that it could not apply:
    a gap in the sequence, a malformed message): send your whole prefix cache again, as a reset."""

    scheduler_id: Id
    reason: Text = ""


MigrationMode = Literal["live", "blocking", "recompute"]


class MigrateCommand(RequestMessage, kw_only=True, frozen=True):
    """Be the source of a migration to `dst_worker_id`. With `request_id` None the source picks
    (lowest priority first, then shortest context). Answered by Ack(detail=<request id>) once
    started, or ErrorReply. The outcome follows as MigrationResult to the scheduler.

    `mode`: "live" (multi-stage pre-copy, design §5); "blocking" (stop, copy every block, resume
    there); "recompute" (stop, move only the state: the destination prefills the tokens again).
    The last two are the baselines of `kvferry bench migration`."""

    migration_id: Id
    request_id: Id | None = None
    dst_worker_id: Id
    dst_endpoint: Endpoint  # the destination's migration socket
    reason: Text = ""  # load, defrag, priority, drain, ctl
    mode: MigrationMode = "live"


class CancelMigration(RequestMessage, kw_only=True, frozen=True):
    """Abort a migration if it has not committed yet (the request stays on the source)."""

    migration_id: Id


class Drain(RequestMessage, kw_only=True, frozen=True):
    """Start (draining=True) or stop (False) draining: report `draining` and accept no new requests."""

    draining: bool = True


class SetRole(RequestMessage, kw_only=True, frozen=True):
    """Serve in `role` from now on (ctl role, adaptive roles). Answered by Ack."""

    role: InstanceRole


class DecodeTarget(RequestMessage, kw_only=True, frozen=True):
    """To a prefill worker: hand prefilled requests to this decode worker (its migration socket)
    from now on; `worker_id` None: none has room, keep them. The scheduler sends it whenever the
    target changes, and again now and then. Answered by Ack."""

    worker_id: Id | None = None
    migration_endpoint: Endpoint | None = None


class Shutdown(RequestMessage, kw_only=True, frozen=True):
    """Exit: after draining if `drain_first` (bounded by the worker's drain deadline), else at once."""

    drain_first: bool = True
    reason: Text = ""


# ---- worker ↔ worker migration -------------------------------------------------------------------

TransferPath = Literal["frames", "shm"]


class MigrateReserve(RequestMessage, kw_only=True, frozen=True):
    """Source → destination: reserve `num_blocks` more blocks for the migration (additive per stage).

    Stage 0 opens the migration on the destination: it checks the KV layout (`block_size`,
    `kv_bytes_per_block`, `kv_dtype`, and `kv_layout`: the engine's byte order of a block, empty
    for kvferry's engine) and picks the data path from where the source's cache is (`src_host`,
    `src_device`; `path` forces one). `token_ids` (stage 0, optional): the tokens of the request's
    full computed blocks, with its `cache_salt`; a destination whose prefix cache holds the leading
    blocks of those (hashed its own way) links them into the reservation and says how many in
    ReserveReply.cached_blocks, and the source sends only the blocks after them."""

    migration_id: Id
    request_id: Id
    src_worker_id: Id
    stage: Count = 0
    num_blocks: Count
    block_size: PositiveCount
    kv_bytes_per_block: Count = 0
    kv_dtype: Name = ""
    kv_layout: Name = ""
    src_host: Name = ""
    src_device: Name = "cpu"
    path: TransferPath | None = None
    token_ids: TokenIds = []
    cache_salt: CacheSalt = ""


class ReserveReply(ReplyMessage, kw_only=True, frozen=True):
    """Destination → source: the newly reserved block ids (ok) or why not (no_room, busy,
    draining, layout, ...), and the data path to use (decided at stage 0)."""

    migration_id: Id
    ok: bool
    block_ids: BlockIds = []
    reason: Text = ""
    path: TransferPath = "frames"
    # Stage 0: how many of the reserved blocks (the first ones) already hold the request's KV here
    # (cached prefix, linked): the source sends none of them.
    cached_blocks: Count = 0


class MigrateBlocks(RequestMessage, kw_only=True, frozen=True):
    """Source → destination: KV for `dst_block_ids`. With path "frames" the data follows this
    envelope as one ZeroMQ frame per `tensors` entry (see protocol.frames); other paths put it in
    a staging area the two workers agreed on, and `tensors` only describes it."""

    migration_id: Id
    stage: Count = 0
    dst_block_ids: BlockIds
    tensors: Annotated[list[TensorSpec], Meta(max_length=MAX_TENSORS)] = []
    path: TransferPath = "frames"
    seq: NonNegInt = 0  # chunk number within the migration
    staging: Name = ""  # shm: the staging buffer's name (kv_transfer.shm)
    staging_bytes: NonNegInt = 0
    offset: NonNegInt = 0  # shm: where the chunk lies in the staging buffer
    final: bool = False  # part of the last stage (the request is out of every batch): write it first


class BlocksAck(ReplyMessage, kw_only=True, frozen=True):
    """Destination → source: the blocks of one MigrateBlocks are written (or not, with a reason)."""

    migration_id: Id
    ok: bool = True
    reason: Text = ""


class MigrateCommit(RequestMessage, kw_only=True, frozen=True):
    """Source → destination, last stage: the request's state; the destination adds it to its batch
    and streams from `next_index` (the output index of the next token) to `reply_address`."""

    migration_id: Id
    state: MigratableState
    frontend_id: Id
    reply_address: Endpoint
    next_index: Count
    frontend_incarnation: Incarnation = ""


class CommitAck(ReplyMessage, kw_only=True, frozen=True):
    """Destination → source: committed (ok) — the source may free its blocks — or refused."""

    migration_id: Id
    ok: bool
    reason: Text = ""


class MigrateAbort(Message, kw_only=True, frozen=True):
    """Either side: give up a migration. The destination frees the reservation, the source keeps
    (or re-attaches) the request."""

    migration_id: Id
    reason: Text = ""


WorkerControlInbound = Union[
    AddRequest, AbortRequest, Heartbeat, MigrateCommand, CancelMigration, Drain, SetRole, DecodeTarget, Shutdown,
    Ping,
]
"""Everything a worker's control ROUTER accepts."""

WorkerMigrationInbound = Union[MigrateReserve, MigrateBlocks, MigrateCommit, MigrateAbort, Ping]
"""Everything a worker's migration ROUTER accepts (the destination role)."""

WorkerSchedulerReplies = Union[RegisterReply, ResyncKvEvents, Ack, Pong, ErrorReply]
"""What a worker receives back on its DEALER to the scheduler."""

WorkerMigrationReplies = Union[ReserveReply, BlocksAck, CommitAck, MigrateAbort, Pong, ErrorReply]
"""What the source of a migration receives back on its DEALER."""
