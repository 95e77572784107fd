"""Typed, versioned msgpack messages exchanged between kvferry's processes over ZeroMQ.

Modules (import the names from here):
- errors: ProtocolError and its subclasses, the only exceptions decoding raises.
- fields: size limits, constrained field types, PROTOCOL_VERSION.
- base: Message / RequestMessage / ReplyMessage, msg ids, epoch-ms deadlines, `expired`.
- common: ErrorReply, Ack, Heartbeat, Ping, Pong (used by every service).
- payloads: SamplingParams, MigratableState, TensorSpec, WorkerEndpoints, RequestLoadEntry.
- to_scheduler / to_worker / to_frontend: the messages, grouped by who receives them, with a
  Union per receiving socket (SchedulerInbound, WorkerControlInbound, ...) to pass as `allowed`.
- codec: encode / decode of one envelope frame.
- frames: tensors as extra frames without copies (pack_tensor_frames / unpack_tensor_frames).
- sockets: asyncio ZeroMQ wrappers (MessageSocket, Requester, request, serve).
- addresses: ClusterAddresses, the one config every endpoint derives from.
- client: the SDK <-> frontend messages (GenerateRequest, GenerateChunk, CancelGenerate).
- security: CurveZMQ keys (`kvferry keys generate`) and `secure()`, which every socket factory calls.
"""

from protocol.addresses import ClusterAddresses
from protocol.base import (
    DEFAULT_TIMEOUT_S,
    MESSAGE_TYPES,
    Message,
    ReplyMessage,
    RequestMessage,
    deadline_in,
    expired,
    new_msg_id,
    now_ms,
    remaining_s,
)
from protocol.client import (
    CancelGenerate,
    ChatMessage,
    ClientInbound,
    FrontendSdkInbound,
    GenerateChunk,
    GenerateChunks,
    GenerateRequest,
    Usage,
)
from protocol.codec import decode, decode_as, encode, validate
from protocol.common import Ack, ErrorCode, ErrorReply, Heartbeat, Ping, Pong, error_reply
from protocol.errors import (
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UnknownMessageType,
    ValidationError,
    VersionMismatch,
)
from protocol.fields import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from protocol.payloads import (Grammar, MigratableState, RequestLoadEntry, SamplingParams, TensorSpec, TokenLogprobs,
                               WorkerEndpoints)
from protocol.to_frontend import (
    DispatchReply,
    FrontendTokenInbound,
    InstanceStatus,
    RequestLocation,
    RequestMoved,
    ScaleAdvice,
    SchedulerReplies,
    ScalingStatus,
    StatusReply,
    TokenBatch,
    TokenBatches,
)
from protocol.to_scheduler import (
    Deregister,
    DispatchRequest,
    DrainInstance,
    KvEvents,
    LoadReport,
    MigrateRequestTo,
    MigrationResult,
    RegisterWorker,
    ScaleQuery,
    SchedulerInbound,
    SetInstanceRole,
    StatusRequest,
    UndrainInstance,
)
from protocol.to_worker import (
    AbortRequest,
    AddRequest,
    BlocksAck,
    CancelMigration,
    CommitAck,
    DecodeTarget,
    Drain,
    MigrateAbort,
    MigrateBlocks,
    MigrateCommand,
    MigrateCommit,
    MigrateReserve,
    RegisterReply,
    ReserveReply,
    ResyncKvEvents,
    SetRole,
    Shutdown,
    WorkerControlInbound,
    WorkerMigrationInbound,
    WorkerMigrationReplies,
    WorkerSchedulerReplies,
)

__all__ = [name for name in dir() if not name.startswith("_") and name not in {
    "addresses", "base", "client", "codec", "common", "errors", "fields", "payloads", "to_frontend", "to_scheduler", "to_worker",
}]
