"""Bulk tensors as extra ZeroMQ frames: never inside msgpack, never pickled, no copies.

A multipart message is `[envelope, data_0, data_1, ...]`. The envelope is a message with a
`tensors: list[TensorSpec]` field (e.g. MigrateBlocks) giving each data frame's dtype (from a
fixed allow-list) and shape. `pack_tensor_frames` fills that field in and returns the tensors'
own memory as buffers: send them with `copy=False` and do not modify the tensors until ZeroMQ is
done with them (`track=True` gives a MessageTracker). `unpack_tensor_frames` builds tensors with
`torch.frombuffer` over the received frames' memory after checking every byte count.

The one protocol module that needs torch: the kvferry-sdk distribution (sdk/pyproject.toml) ships
protocol/ without torch, and only tensor paths (MessageSocket.send_tensors, Received.tensors, the
workers' KV transfer) import this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

try:
    import torch
except ImportError as e:  # an SDK-only install (kvferry-sdk): no tensors travel there
    raise ImportError("protocol.frames needs torch, which the kvferry server distribution installs; "
                      "the SDK (kvferry-sdk) never imports it") from e

from protocol.base import Message
from protocol.codec import Allowed, decode, encode
from protocol.errors import MalformedMessage, MessageTooLarge
from protocol.fields import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_MESSAGE_BYTES, MAX_TENSORS
from protocol.payloads import TensorSpec

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

Frame = Any  # bytes, bytearray, memoryview or zmq.Frame
M = TypeVar("M", bound=Message)


def tensor_spec(t: torch.Tensor) -> TensorSpec:
    """The descriptor of `t`; TypeError for a dtype outside the allow-list."""
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"dtype {t.dtype} cannot travel in tensor frames (allowed: {', '.join(DTYPES)})")
    return TensorSpec(dtype=name, shape=list(t.shape))


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """A byte view of `t`'s memory. Zero-copy for a contiguous CPU tensor; otherwise one copy
    (to host memory, or to make it contiguous)."""
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    # numpy has no bfloat16/float8: view the bytes as uint8. The array keeps the tensor alive.
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def with_tensor_specs(header: M, tensors: Sequence[torch.Tensor]) -> M:
    """A copy of `header` whose `tensors` field describes `tensors`."""
    if not hasattr(header, "tensors"):
        raise TypeError(f"{type(header).__name__} has no `tensors` field to describe data frames")
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"{len(tensors)} tensors exceed the limit of {MAX_TENSORS} per message")
    return msgspec.structs.replace(header, tensors=[tensor_spec(t) for t in tensors])


def pack_tensor_frames(header: Message, tensors: Sequence[torch.Tensor],
                       max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[bytes | memoryview]:
    """`[envelope, *buffers]` for `header` (its `tensors` field replaced by the tensors' specs).

    Send with `send_multipart(frames, copy=False)` (or `MessageSocket.send_tensors`)."""
    header = with_tensor_specs(header, tensors)
    return [encode(header, max_bytes=max_bytes), *(tensor_buffer(t) for t in tensors)]


def _buffer(frame: Frame) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame: a writable view of ZeroMQ's message memory
    mv = buf if isinstance(buf, memoryview) else memoryview(frame)
    if mv.ndim != 1 or mv.format not in ("B", "b", "c"):
        mv = mv.cast("B")
    return mv


def _tensor_from_frame(spec: TensorSpec, frame: Frame, index: int, max_frame_bytes: int) -> torch.Tensor:
    dtype = DTYPES[spec.dtype]  # the decoder already restricted dtype to the allow-list
    mv = _buffer(frame)
    if mv.nbytes > max_frame_bytes:
        raise MessageTooLarge(mv.nbytes, max_frame_bytes)
    expected = math.prod(spec.shape) * dtype.itemsize
    if mv.nbytes != expected:
        raise MalformedMessage(f"tensor frame {index}: {mv.nbytes} bytes, but {spec.dtype}{spec.shape} "
                               f"needs {expected}")
    if expected == 0:
        return torch.empty(spec.shape, dtype=dtype)
    if mv.readonly:
        # torch.frombuffer cannot share read-only memory (e.g. bytes); receive with copy=False to avoid this copy.
        mv = memoryview(bytearray(mv))
    raw = torch.frombuffer(mv, dtype=torch.uint8)
    if raw.data_ptr() % dtype.itemsize:
        raw = raw.clone()  # misaligned frame memory: one copy rather than unaligned element access
    return raw.view(dtype).view(spec.shape)


def unpack_tensor_frames(frames: Sequence[Frame], allowed: Allowed = None,
                         max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                         max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> tuple[Any, list[torch.Tensor]]:
    """Decode `[envelope, *data frames]` into (header, tensors). The tensors share the frames' memory.

    Raises ProtocolError subclasses only: MalformedMessage when the number of frames or any byte
    count does not match the header's specs.
    """
    if not frames:
        raise MalformedMessage("no frames")
    if len(frames) > MAX_TENSORS + 1:
        raise MalformedMessage(f"{len(frames) - 1} data frames exceed the limit of {MAX_TENSORS}")
    try:
        envelope = _buffer(frames[0])
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"envelope frame is not a byte buffer: {exc}") from None
    header = decode(envelope, allowed, max_bytes)
    return header, tensors_from_frames(header, frames[1:], max_frame_bytes)


def tensors_from_frames(header: Message, frames: Sequence[Frame],
                        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> list[torch.Tensor]:
    """The tensors `header.tensors` describes, built over `frames` (the data frames after the
    envelope) without copies. MalformedMessage when counts or byte sizes do not match."""
    specs = getattr(header, "tensors", None) or []
    msg_id = getattr(header, "msg_id", None)
    if len(frames) != len(specs):
        raise MalformedMessage(f"{type(header).__name__} describes {len(specs)} tensors but {len(frames)} "
                               f"data frames came", reply_to=msg_id)
    tensors = []
    for i, (spec, frame) in enumerate(zip(specs, frames)):
        try:
            tensors.append(_tensor_from_frame(spec, frame, i, max_frame_bytes))
        except (MalformedMessage, MessageTooLarge) as exc:
            exc.reply_to = msg_id
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            raise MalformedMessage(f"tensor frame {i}: {exc}", reply_to=msg_id) from None
    return tensors
