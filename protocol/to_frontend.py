"""Messages a frontend (or another scheduler client such as `kvferry ctl`) receives.

From workers, on the frontend's token socket (FrontendTokenInbound): TokenBatch / TokenBatches
(the stream), RequestMoved (a migration committed: aborts now go to the new owner).
From the scheduler, as replies (SchedulerReplies): DispatchReply, StatusReply, ScaleAdvice (to a
pool manager's ScaleQuery), Ack, Pong, ErrorReply.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from protocol.base import Message, ReplyMessage
from protocol.common import Ack, ErrorReply, Pong
from protocol.fields import (
    MAX_BATCHES_PER_MESSAGE,
    MAX_INSTANCES,
    MAX_PROMPT_TOKENS,
    MAX_REQUESTS_PER_INSTANCE,
    BlockHash,
    Count,
    EpochMs,
    Endpoint,
    Id,
    IdList,
    InstanceRole,
    Name,
    Priority,
    Text,
    TokenIds,
)
from protocol.payloads import TokenLogprobs, WorkerEndpoints

FinishReason = Literal["stop", "length", "abort", "error"]  # engine.request.FinishReason values


class TokenBatch(Message, kw_only=True, frozen=True):
    """New tokens of one request. `first_index` is the output index of token_ids[0]: the frontend
    appends only when first_index == tokens received so far, so streams stay gapless and
    duplicate-free across migrations and resumptions. A final batch has `finish_reason` set
    (and `error` when it is "error"); it may carry no tokens. `logprobs`, when the request asked
    for them, has one entry per token of `token_ids`; `prompt_logprobs` (with the request's first
    token) one per prompt token, the first None."""

    request_id: Id
    first_index: Count
    token_ids: TokenIds = []
    finish_reason: FinishReason | None = None
    error: Text | None = None
    worker_id: Id
    logprobs: Annotated[list[TokenLogprobs], Meta(max_length=MAX_PROMPT_TOKENS)] | None = None
    prompt_logprobs: Annotated[list[TokenLogprobs | None], Meta(max_length=MAX_PROMPT_TOKENS)] | None = None

    def __post_init__(self) -> None:
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError("logprobs and token_ids differ in length")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TokenBatches(Message, kw_only=True, frozen=True):
    """All of one engine step's TokenBatch for one frontend in one message (fewer sends per step)."""

    worker_id: Id
    batches: Annotated[list[TokenBatch], Meta(max_length=MAX_BATCHES_PER_MESSAGE)]


class RequestMoved(Message, kw_only=True, frozen=True):
    """A migration committed: `worker_id` owns the request now and streams from `next_index`."""

    request_id: Id
    worker_id: Id
    control_endpoint: Endpoint
    next_index: Count


# ---- scheduler replies ---------------------------------------------------------------------------

class DispatchReply(ReplyMessage, kw_only=True, frozen=True):
    """Send the request to this worker (its control endpoint). `kv_namespace` and `kv_block_size`:
    how the cluster's workers hash KV blocks (those of most of them; 0: no prefix caching), for the
    frontend to send the block hashes of its next prompts (DispatchRequest.block_hashes)."""

    request_id: Id
    worker_id: Id
    worker_address: Endpoint
    kv_namespace: BlockHash = 0
    kv_block_size: Count = 0


class InstanceStatus(msgspec.Struct, kw_only=True, frozen=True):
    """One instance as the scheduler sees it (a row of `kvferry ctl status`)."""

    worker_id: Id
    endpoints: WorkerEndpoints
    host: Name = ""
    engine: Name = ""
    model: Name = ""
    total_blocks: Count = 0
    free_blocks: Count = 0
    block_size: Count = 0
    num_running: Count = 0
    num_waiting: Count = 0
    freeness: float = 0.0  # may be ±inf (empty or draining instance)
    alive: bool = True
    draining: bool = False
    last_report_ms: EpochMs = 0
    registered_ms: EpochMs = 0  # when it (last) registered: a restarted worker registers anew
    pid: Count = 0  # its process id, as it registered
    cached_blocks: Count = 0  # blocks in its prefix cache, as it reported
    indexed_blocks: Count = 0  # of its cached blocks, those the scheduler's prefix index holds
    role: InstanceRole = "mixed"

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks


class RequestLocation(msgspec.Struct, kw_only=True, frozen=True, array_like=True):
    """Where a request runs now."""

    request_id: Id
    worker_id: Id
    priority: Priority = 0
    num_tokens: Count = 0
    running: bool = True


ScaleActionKind = Literal["none", "up", "down"]
Seconds = Annotated[float, Meta(ge=0.0, le=1e15)]


class ScalingStatus(msgspec.Struct, kw_only=True, frozen=True):
    """The scheduler's auto-scaling state (in StatusReply when scaling is configured)."""

    min_instances: Count = 1
    max_instances: Count = 1
    average_freeness: float = 0.0  # of the serving instances; may be ±inf
    manager_id: Name = ""  # the pool manager heard from lately ("" when none: no action is taken)
    last_action: ScaleActionKind = "none"
    last_action_ms: EpochMs = 0
    scale_ups: Count = 0  # "up" decisions so far
    scale_downs: Count = 0  # instances drained to be stopped so far
    retiring: IdList = []  # draining to be stopped once empty


class StatusReply(ReplyMessage, kw_only=True, frozen=True):
    """Answer to StatusRequest. `instance_seconds`: the seconds every instance was registered and
    alive, summed over instances, since the scheduler started (the cost of the pool)."""

    scheduler_id: Id
    instances: Annotated[list[InstanceStatus], Meta(max_length=MAX_INSTANCES)] = []
    requests: Annotated[list[RequestLocation], Meta(max_length=MAX_INSTANCES * MAX_REQUESTS_PER_INSTANCE)] = []
    policy: Name = ""
    instance_seconds: Seconds = 0.0
    scaling: ScalingStatus | None = None


class ScaleAdvice(ReplyMessage, kw_only=True, frozen=True):
    """Answer to ScaleQuery: start `start` more workers now (0 or 1), stop the workers in `stop`
    (drained by the scheduler, now empty, or dead). Each advice is given once for `start` (a lost
    reply is made up by the next decision); `stop` repeats until the worker has left. With
    `enabled` false (scaling is off in the scheduler) the manager keeps its pool as it is."""

    scheduler_id: Id
    enabled: bool = False
    start: Annotated[int, Meta(ge=0, le=MAX_INSTANCES)] = 0
    stop: IdList = []
    retiring: IdList = []  # draining to be stopped once empty (not to be stopped yet)
    serving: Count = 0  # live, non-draining instances
    average_freeness: float = 0.0
    instance_seconds: Seconds = 0.0


FrontendTokenInbound = Union[TokenBatch, TokenBatches, RequestMoved]
"""Everything a frontend's token socket accepts (from workers)."""

SchedulerReplies = Union[DispatchReply, StatusReply, ScaleAdvice, Ack, Pong, ErrorReply]
"""What a frontend or ctl receives back on its DEALER to the scheduler."""
