"""Messages a frontend (or another scheduler client such as `kvferry ctl`) receives.

From workers, on the frontend's token socket (FrontendTokenInbound): TokenBatch / TokenBatches
(the stream), RequestMoved (a migration committed: aborts now go to the new owner).
From the scheduler, as replies (SchedulerReplies): DispatchReply, StatusReply, Ack, Pong, ErrorReply.
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
    MAX_REQUESTS_PER_INSTANCE,
    Count,
    EpochMs,
    Endpoint,
    Id,
    Name,
    Priority,
    Text,
    TokenIds,
)
from protocol.payloads import WorkerEndpoints

FinishReason = Literal["stop", "length", "abort", "error"]  # engine.request.FinishReason values


class TokenBatch(Message, kw_only=True, frozen=True):
    """New tokens of one request. `first_index` is the output index of token_ids[0]: the frontend
    appends only when first_index == tokens received so far, so streams stay gapless and
    duplicate-free across migrations and resumptions. A final batch has `finish_reason` set
    (and `error` when it is "error"); it may carry no tokens."""

    request_id: Id
    first_index: Count
    token_ids: TokenIds = []
    finish_reason: FinishReason | None = None
    error: Text | None = None
    worker_id: Id

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
    """Send the request to this worker (its control endpoint)."""

    request_id: Id
    worker_id: Id
    worker_address: Endpoint


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


class StatusReply(ReplyMessage, kw_only=True, frozen=True):
    """Answer to StatusRequest."""

    scheduler_id: Id
    instances: Annotated[list[InstanceStatus], Meta(max_length=MAX_INSTANCES)] = []
    requests: Annotated[list[RequestLocation], Meta(max_length=MAX_INSTANCES * MAX_REQUESTS_PER_INSTANCE)] = []
    policy: Name = ""


FrontendTokenInbound = Union[TokenBatch, TokenBatches, RequestMoved]
"""Everything a frontend's token socket accepts (from workers)."""

SchedulerReplies = Union[DispatchReply, StatusReply, Ack, Pong, ErrorReply]
"""What a frontend or ctl receives back on its DEALER to the scheduler."""
