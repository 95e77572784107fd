"""Property tests: whatever bytes arrive, decoding gives a message or a ProtocolError — nothing else."""

from __future__ import annotations

import math
import os

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol
from protocol import PROTOCOL_VERSION, Message, ProtocolError, decode, encode
from protocol.examples import example_messages
from protocol.frames import DTYPES, pack_tensor_frames, unpack_tensor_frames

# A 2-core machine: no per-example deadline, a bounded number of examples per property
# (KVFERRY_FUZZ_EXAMPLES=100000 for a long soak).
FUZZ = settings(max_examples=int(os.environ.get("KVFERRY_FUZZ_EXAMPLES", "600")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

EXAMPLES = example_messages()
ENCODED = [encode(m) for m in EXAMPLES]
TAGS = sorted(protocol.MESSAGE_TYPES) + ["", "Nope", "Message", "RequestMessage"]
ALLOWED = [None, protocol.SchedulerInbound, protocol.WorkerControlInbound, protocol.WorkerMigrationInbound,
           protocol.FrontendTokenInbound, (protocol.Ping, protocol.Pong)]
FIELD_NAMES = sorted({f for cls in protocol.MESSAGE_TYPES.values() for f in cls.__struct_fields__})


def check_decode(data: bytes, allowed: object = None) -> None:
    """The property: a message of an allowed type, or a ProtocolError (anything else fails the test)."""
    try:
        msg = decode(data, allowed, max_bytes=1 << 20)
    except ProtocolError as exc:
        assert exc.code and str(exc)
        return
    assert isinstance(msg, Message)
    again = encode(msg)
    assert encode(decode(again)) == again  # whatever was accepted re-encodes stably (bytes: NaN-safe)


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(ALLOWED))
def test_arbitrary_bytes(data, allowed):
    check_decode(data, allowed)


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """`data` with 1-4 random edits: bit flips, msgpack type bytes, inserts, deletes, truncation,
    repeats (shared with test_fuzz_properties)."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and buf:
            buf[pos] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xA0, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCA,
                                             0xCB, 0xCF, 0xD3, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF]))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 6))]
        elif op == "truncate":
            del buf[pos:]
        elif op == "dup":
            buf[pos:pos] = buf[pos:pos + draw(st.integers(1, 16))]
    return bytes(buf)


@st.composite
def mutated_encodings(draw):
    """A valid encoding, edited; sometimes with another encoding's tail spliced in."""
    data = draw(mutations(draw(st.sampled_from(ENCODED))))
    if draw(st.booleans()):
        other = draw(st.sampled_from(ENCODED))
        pos, start = draw(st.integers(0, len(data))), draw(st.integers(0, len(other)))
        data = data[:pos] + other[start:]
    return data


@FUZZ
@given(mutated_encodings(), st.sampled_from(ALLOWED))
def test_mutated_valid_encodings(data, allowed):
    check_decode(data, allowed)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20) | st.sampled_from(FIELD_NAMES),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), children, max_size=5),
    max_leaves=25,
)


@st.composite
def structured_envelopes(draw):
    """Well-formed msgpack with a real tag and plausible field names but hostile values."""
    tag = draw(st.sampled_from(TAGS))
    base = next((msgpack.unpackb(e, raw=False)[2] for e, m in zip(ENCODED, EXAMPLES) if type(m).__name__ == tag), {})
    body = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(body) or FIELD_NAMES), max_size=3)):
        if draw(st.booleans()):
            body[key] = draw(msgpack_values)
        else:
            body.pop(key, None)
    version = draw(st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, -1, "1", None, 1.0]))
    env = draw(st.sampled_from([[version, tag, body], [version, tag], [version, tag, body, 1], {"v": version},
                                [version, tag, draw(msgpack_values)]]))
    return msgpack.packb(env, use_bin_type=True)


@FUZZ
@given(structured_envelopes(), st.sampled_from(ALLOWED))
def test_structured_hostile_values(data, allowed):
    check_decode(data, allowed)


@FUZZ
@given(st.sampled_from(EXAMPLES))
def test_examples_survive_a_round_trip(msg):
    assert decode(encode(msg), type(msg)) == msg


@st.composite
def tensor_frame_sets(draw):
    header = protocol.MigrateBlocks(migration_id="m", dst_block_ids=[0], msg_id="m-1", deadline_ms=1)  # fixed size
    tensors = []
    for _ in range(draw(st.integers(0, 3))):
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = math.prod(shape) * dtype.itemsize
        raw = bytearray(draw(st.binary(min_size=n, max_size=n)))
        tensors.append(torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape) if n
                       else torch.empty(shape, dtype=dtype))
    frames = [bytes(f) for f in pack_tensor_frames(header, tensors)]
    # then damage it: drop/duplicate frames, resize a data frame, or mutate the envelope
    op = draw(st.sampled_from(["none", "drop", "dup", "resize", "envelope"]))
    if op == "drop" and len(frames) > 1:
        frames.pop(draw(st.integers(1, len(frames) - 1)))
    elif op == "dup":
        frames.append(frames[-1])
    elif op == "resize" and len(frames) > 1:
        i = draw(st.integers(1, len(frames) - 1))
        frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=4)) if draw(st.booleans()) else frames[i][:-1]
    elif op == "envelope":
        env = bytearray(frames[0])
        env[draw(st.integers(0, len(env) - 1))] = draw(st.integers(0, 255))
        frames[0] = bytes(env)
    return frames, tensors, op


@FUZZ
@given(tensor_frame_sets())
def test_tensor_frames_any_damage(case):
    frames, tensors, op = case
    try:
        header, got = unpack_tensor_frames(frames, None)
    except ProtocolError:
        assert op != "none"
        return
    if op == "none":
        as_bytes = [t.reshape(-1).view(torch.uint8) for t in got + tensors]
        assert all(torch.equal(a, b) for a, b in zip(as_bytes[:len(got)], as_bytes[len(got):]))
    assert len(got) == len(getattr(header, "tensors", []) or [])


@pytest.mark.parametrize("data", [b"\x93\x01\xaaAddRequest" + b"\xdf\xff\xff\xff\xff",  # map claims 4G entries
                                  b"\x93\x01\xa4Ping\xdd\xff\xff\xff\xff",  # array claims 4G items
                                  b"\x93\x01\xa4Ping\xdb\xff\xff\xff\xff"])  # str claims 4 GB
def test_length_prefixes_cannot_force_big_allocations(data):
    with pytest.raises(ProtocolError):
        decode(data)
