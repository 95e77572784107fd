"""Size limits and constrained field types shared by every message.

msgspec checks these constraints while decoding (not when a message is constructed), so a
hostile or buggy peer cannot make a receiver allocate unbounded lists or strings, and values
arrive in range. The limits are deliberately generous for honest traffic.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

PROTOCOL_VERSION = 1

# Whole envelope frame (the msgpack part; bulk tensors travel in their own frames).
DEFAULT_MAX_MESSAGE_BYTES = 32 << 20
# One tensor data frame on a migration socket (ZeroMQ MAXMSGSIZE limits each frame).
DEFAULT_MAX_FRAME_BYTES = 1 << 30

MAX_ID_LEN = 128
MAX_TEXT_LEN = 4096  # error messages, reasons, details
MAX_NAME_LEN = 256  # model names, hosts
MAX_ENDPOINT_LEN = 256
MAX_PROMPT_TOKENS = 1 << 20
MAX_STOP_TOKENS = 1024
MAX_TOKEN_ID = (1 << 31) - 1
MAX_BLOCKS = 1 << 32
MAX_REQUESTS_PER_INSTANCE = 1 << 16
MAX_INSTANCES = 1 << 12
MAX_TENSORS = 1024
MAX_TENSOR_DIMS = 8
MAX_GENERATOR_STATE_BYTES = 1 << 16  # a CPU torch.Generator state is ~5 KB, a CUDA one 16 bytes
MAX_BATCHES_PER_MESSAGE = 1 << 14
MAX_KV_EVENT_HASHES = 4096  # stored (and removed) hashes per KvEvents: a bigger batch is split
MAX_BLOCK_HASHES = 1 << 16  # a prompt's block hashes in a DispatchRequest (its leading blocks beyond are not sent)

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1

# Printable ASCII without spaces or quotes: ids end up in logs, metrics labels and shell commands.
Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9_.:@/+=\-]+$")]
Text = Annotated[str, Meta(max_length=MAX_TEXT_LEN)]
# One start of a process (a random hex string); "" where the sender does not say (older senders).
Incarnation = Annotated[str, Meta(max_length=MAX_ID_LEN, pattern=r"^[A-Za-z0-9_.:@/+=\-]*$")]
Name = Annotated[str, Meta(max_length=MAX_NAME_LEN)]
CacheSalt = Annotated[str, Meta(max_length=MAX_NAME_LEN)]  # a tenant's prefix-cache namespace (opaque)
Endpoint = Annotated[
    str, Meta(min_length=7, max_length=MAX_ENDPOINT_LEN, pattern=r"^(tcp|ipc|inproc)://[^\s]+$")
]

NonNegInt = Annotated[int, Meta(ge=0, le=INT64_MAX)]
Count = Annotated[int, Meta(ge=0, le=MAX_BLOCKS)]  # blocks, tokens, requests
PositiveCount = Annotated[int, Meta(ge=1, le=MAX_BLOCKS)]
Priority = Annotated[int, Meta(ge=INT32_MIN, le=INT32_MAX)]  # lower is served first
EpochMs = Annotated[int, Meta(ge=0, le=1 << 53)]  # wall-clock time.time() in milliseconds
Seq = Annotated[int, Meta(ge=0, le=INT64_MAX)]
# A KV block's content hash, or a hash namespace (protocol/kv_hash.py): 64 bits, 0 = none. No
# upper bound here (msgspec bounds only int64): msgpack's integers end at UINT64_MAX anyway.
BlockHash = Annotated[int, Meta(ge=0)]

TokenId = Annotated[int, Meta(ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Meta(max_length=MAX_PROMPT_TOKENS)]
BlockIds = Annotated[list[Annotated[int, Meta(ge=0, le=MAX_BLOCKS)]], Meta(max_length=MAX_PROMPT_TOKENS)]
IdList = Annotated[list[Id], Meta(max_length=MAX_INSTANCES)]
KvEventHashes = Annotated[list[BlockHash], Meta(max_length=MAX_KV_EVENT_HASHES)]
BlockHashes = Annotated[list[BlockHash], Meta(max_length=MAX_BLOCK_HASHES)]

InstanceRole = Literal["mixed", "prefill", "decode"]  # prefill/decode disaggregation (policy.pd)
