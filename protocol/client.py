"""Messages between the Python SDK (sdk/) and a frontend's SDK endpoint (a ROUTER).

Client → frontend (FrontendSdkInbound): GenerateRequest (→ a stream of GenerateChunk, or one
ErrorReply), CancelGenerate (one-way), Ping (→ Pong).
Frontend → client (ClientInbound): GenerateChunk, GenerateChunks, ErrorReply, Pong.

A GenerateRequest's `msg_id` correlates everything: every GenerateChunk of its answer carries
`reply_to = msg_id`; the last chunk has `finish_reason` and `usage` set. Without `stream` the
answer is a single, final chunk holding all text and tokens. ErrorReply codes: invalid (bad
request, prompt too long), overloaded (retry later), unavailable (no worker), expired (deadline
passed), unauthorized (the frontend has an API key and `api_key` is missing or wrong), internal.
`api_key` is an optional field added without a version bump: older peers ignore or omit it.
So is `batch_chunks`: a client that sets it may get the streamed chunks of its requests as
GenerateChunks (those of one worker step together, one message instead of one per request);
each chunk in it means what it would alone, in order per request.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from protocol.base import Message, ReplyMessage, RequestMessage
from protocol.common import ErrorReply, Ping, Pong
from protocol.fields import MAX_NAME_LEN, CacheSalt, Count, Id, Priority, TokenIds
from protocol.payloads import SamplingParams

MAX_PROMPT_CHARS = 16 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
MAX_CHAT_MESSAGES = 4096
MAX_API_KEY_CHARS = 1024
MAX_BATCHED_CHUNKS = 1024

PromptText = Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
ClientFinishReason = Literal["stop", "length"]


class ChatMessage(msgspec.Struct, kw_only=True, frozen=True):
    """One chat turn; the frontend applies the model's chat template to the list."""

    role: Annotated[str, Meta(min_length=1, max_length=MAX_NAME_LEN)]
    content: PromptText


class Usage(msgspec.Struct, kw_only=True, frozen=True):
    """Token counts of one finished request (OpenAI's `usage`)."""

    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count


class GenerateRequest(RequestMessage, kw_only=True, frozen=True):
    """Generate for exactly one of `prompt` (text), `prompt_token_ids` or `messages` (chat).

    `deadline_ms` bounds the whole generation (the frontend also applies its request timeout).
    `stop` strings are checked in the frontend and not included in the text.
    """

    prompt: PromptText | None = None
    prompt_token_ids: TokenIds | None = None
    messages: Annotated[list[ChatMessage], Meta(max_length=MAX_CHAT_MESSAGES)] | None = None
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stop: Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] = []
    priority: Priority = 0
    stream: bool = True
    api_key: Annotated[str, Meta(max_length=MAX_API_KEY_CHARS)] | None = None  # [frontend] api_key, if set
    batch_chunks: bool = False  # this client takes GenerateChunks (see the module docstring)
    cache_salt: CacheSalt = ""  # prefix-cache namespace: KV is reused only among requests with the same salt

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.prompt_token_ids, self.messages))
        if given != 1:
            raise ValueError("give exactly one of prompt, prompt_token_ids, messages")


class GenerateChunk(ReplyMessage, kw_only=True, frozen=True):
    """Part of the answer to a GenerateRequest (`reply_to` = its msg_id). `first_index` is the
    output index of token_ids[0]; the final chunk has `finish_reason` and `usage`."""

    request_id: Id
    text: PromptText = ""
    token_ids: TokenIds = []
    first_index: Count = 0
    finish_reason: ClientFinishReason | None = None
    usage: Usage | None = None


class GenerateChunks(Message, kw_only=True, frozen=True):
    """Streamed chunks of several requests of one client, sent together (only to a client whose
    GenerateRequest set `batch_chunks`): per worker step, one message per client, not per request."""

    chunks: Annotated[list[GenerateChunk], Meta(min_length=1, max_length=MAX_BATCHED_CHUNKS)]


class CancelGenerate(Message, kw_only=True, frozen=True):
    """Stop the generation started by the GenerateRequest whose msg_id is `target` (one-way)."""

    target: Id


FrontendSdkInbound = Union[GenerateRequest, CancelGenerate, Ping]
"""Everything a frontend's SDK ROUTER accepts."""

ClientInbound = Union[GenerateChunk, GenerateChunks, ErrorReply, Pong]
"""What an SDK client receives on its DEALER."""
