"""protocol/: message round trips, every typed error, deadlines, tensor frames, addresses, and live
ZeroMQ sockets that receive garbage and keep serving."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time

import msgpack
import msgspec
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio

import protocol
from protocol import (
    PROTOCOL_VERSION,
    AddRequest,
    ClusterAddresses,
    ErrorReply,
    LoadReport,
    MalformedMessage,
    MessageTooLarge,
    MigrateBlocks,
    Ping,
    Pong,
    ProtocolError,
    RemoteError,
    MigratableState,
    RequestTimeout,
    SamplingParams,
    SchedulerInbound,
    TokenBatch,
    UnknownMessageType,
    ValidationError,
    VersionMismatch,
    decode,
    encode,
    expired,
)
from protocol.examples import example_messages
from protocol.frames import pack_tensor_frames, tensor_buffer, unpack_tensor_frames
from protocol.sockets import MessageSocket, Received, Requester, request, serve

ADD = dict(request_id="r1", prompt_token_ids=[1, 2, 3], frontend_id="fe-0", reply_address="tcp://127.0.0.1:1")


def raw_envelope(v: object, t: object, body: object) -> bytes:
    return msgpack.packb([v, t, body])


def body_of(msg: protocol.Message) -> dict:
    """The msgpack map of a message as plain Python objects, to tamper with."""
    return msgpack.unpackb(encode(msg))[2]


def add_body(**overrides: object) -> dict:
    body = body_of(AddRequest(**ADD))
    body.update(overrides)
    return body


# ---- round trips ---------------------------------------------------------------------------------

def test_every_message_type_has_an_example():
    assert {type(m).__name__ for m in example_messages()} == set(protocol.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", example_messages(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    data = encode(msg)
    assert decode(data, type(msg)) == msg
    assert decode(memoryview(data)) == msg  # allowed=None: any registered type
    assert data[:2] == bytes([0x93, PROTOCOL_VERSION])  # [v, t, body]


def test_destination_unions_accept_their_messages_only():
    ping = encode(Ping(sender_id="x"))
    assert isinstance(decode(ping, SchedulerInbound), Ping)
    with pytest.raises(UnknownMessageType, match="not accepted here"):
        decode(encode(TokenBatch(request_id="r", first_index=0, worker_id="w")), SchedulerInbound)
    # tuples and abstract bases work as `allowed` too
    assert decode(ping, (Pong, Ping)).sender_id == "x"
    assert decode(ping, protocol.RequestMessage).sender_id == "x"
    with pytest.raises(UnknownMessageType):
        decode(ping, protocol.ReplyMessage)


def test_defaults_are_left_out_on_the_wire():
    small = encode(TokenBatch(request_id="r", first_index=3, token_ids=[5], worker_id="w"))
    assert b"finish_reason" not in small and b"error" not in small


def test_messages_are_frozen_and_keyword_only():
    m = Ping(sender_id="a")
    with pytest.raises(AttributeError):
        m.sender_id = "b"
    with pytest.raises(TypeError):
        Ping("a")  # noqa


def test_msg_ids_are_unique():
    ids = {Ping(sender_id="a").msg_id for _ in range(10_000)}
    assert len(ids) == 10_000


def test_sampling_params_mirror_the_engine():
    from engine.request import SamplingParams as EngineSampling

    assert [f.name for f in dataclasses.fields(EngineSampling)] == list(SamplingParams.__struct_fields__)
    ours = next(m for m in example_messages() if type(m).__name__ == "AddRequest").sampling
    eng = EngineSampling.from_dict(ours.to_dict())
    eng.validate()
    assert SamplingParams.from_engine(eng) == ours


def test_request_state_round_trips_an_engine_request():
    from engine.request import Request
    from engine.request import SamplingParams as EngineSampling

    gen = torch.Generator().manual_seed(7)
    req = Request(request_id="cmpl-9", token_ids=[3, 4, 5, 6], num_prompt_tokens=3, num_computed_tokens=3,
                  sampling=EngineSampling(max_tokens=8, temperature=0.8, seed=7), priority=2, generator=gen)
    state = req.export_state()
    assert isinstance(state, MigratableState)
    got = decode(encode(protocol.MigrateCommit(migration_id="m", state=state, frontend_id="fe",
                                               reply_address="ipc:///tmp/x", next_index=1)))
    back = Request.from_state(got.state, torch.device("cpu"))
    assert back.token_ids == req.token_ids and back.sampling == req.sampling and back.priority == 2
    assert torch.equal(back.generator.get_state(), gen.get_state())


# ---- typed errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    b"", b"\xc1", os.urandom(64), b"\x93\x01", encode(Ping(sender_id="a"))[:-3],
    msgpack.packb({"v": 1}), msgpack.packb(12), b"\x91" * 100_000,
    raw_envelope(1, 12, {}), raw_envelope("1", "Ping", {}),
], ids=["empty", "reserved-byte", "random", "short-array", "truncated", "map", "int", "deep", "int-tag", "str-version"])
def test_malformed(data):
    with pytest.raises(MalformedMessage):
        decode(data)


def test_unknown_type_keeps_the_msg_id():
    with pytest.raises(UnknownMessageType, match="'Nope'") as info:
        decode(raw_envelope(PROTOCOL_VERSION, "Nope", {"msg_id": "abc-1"}))
    assert info.value.reply_to == "abc-1" and info.value.code == "unknown_type"


def test_version_mismatch():
    with pytest.raises(VersionMismatch, match="version 99") as info:
        decode(raw_envelope(99, "Ping", {"msg_id": "abc-2", "sender_id": "a"}))
    assert (info.value.got, info.value.expected, info.value.reply_to) == (99, PROTOCOL_VERSION, "abc-2")


def test_too_large_is_checked_before_parsing():
    with pytest.raises(MessageTooLarge, match="1025 bytes exceeds the limit of 1024"):
        decode(b"\xc1" * 1025, max_bytes=1024)  # garbage, yet the size error comes first
    with pytest.raises(MessageTooLarge):
        encode(AddRequest(**{**ADD, "prompt_token_ids": list(range(1000))}), max_bytes=1000)


@pytest.mark.parametrize("overrides, where", [
    (dict(prompt_token_ids="abc"), "prompt_token_ids"),
    (dict(prompt_token_ids=[]), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, -1]), r"prompt_token_ids\[1\]"),
    (dict(prompt_token_ids=[1 << 31]), r"prompt_token_ids\[0\]"),
    (dict(request_id="x" * 129), "request_id"),
    (dict(request_id="has space"), "request_id"),
    (dict(request_id=""), "request_id"),
    (dict(priority=1 << 40), "priority"),
    (dict(priority=1.5), "priority"),
    (dict(first_index=-1), "first_index"),
    (dict(reply_address="http://x"), "reply_address"),
    (dict(deadline_ms=-5), "deadline_ms"),
    (dict(sampling={"temperature": -0.1}), "sampling.temperature"),
    (dict(sampling={"temperature": float("nan")}), "sampling.temperature"),
    (dict(sampling={"top_p": 0.0}), "sampling.top_p"),
    (dict(sampling={"top_k": -1}), "sampling.top_k"),
    (dict(sampling={"max_tokens": 0}), "sampling.max_tokens"),
    (dict(sampling={"seed": 1 << 63}), "sampling.seed"),
    (dict(sampling={"stop_token_ids": list(range(1025))}), "sampling.stop_token_ids"),
    (dict(sampling="greedy"), "sampling"),
], ids=lambda x: str(x)[:40])
def test_validation_errors_name_the_field(overrides, where):
    body = add_body(**overrides)
    with pytest.raises(ValidationError, match=where) as info:
        decode(raw_envelope(PROTOCOL_VERSION, "AddRequest", body))
    assert info.value.reply_to == body["msg_id"]  # probed from the body, so an ErrorReply correlates
    assert info.value.code == "invalid"


def test_validation_missing_field_and_prompt_limit():
    with pytest.raises(ValidationError, match="missing required field `frontend_id`"):
        body = {k: v for k, v in add_body().items() if k != "frontend_id"}
        decode(raw_envelope(PROTOCOL_VERSION, "AddRequest", body))
    huge = encode(AddRequest(**{**ADD, "prompt_token_ids": [1] * ((1 << 20) + 1)}))
    with pytest.raises(ValidationError, match="length <= 1048576"):
        decode(huge)


def test_cross_field_validation():
    # checked when a sender constructs the message (ValueError) and when a receiver decodes it
    good = [m for m in example_messages() if isinstance(m, LoadReport)][0]
    with pytest.raises(ValueError, match="free_blocks exceeds total_blocks"):
        msgspec.structs.replace(good, free_blocks=good.total_blocks + 1)
    body = {**body_of(good), "free_blocks": good.total_blocks + 1}
    with pytest.raises(ValidationError, match="free_blocks exceeds total_blocks"):
        decode(raw_envelope(PROTOCOL_VERSION, "LoadReport", body))
    commit = [m for m in example_messages() if isinstance(m, protocol.MigrateCommit)][0]
    body = body_of(commit)
    body["state"]["num_computed_tokens"] = 5
    with pytest.raises(ValidationError, match="inconsistent token counts") as info:
        decode(raw_envelope(PROTOCOL_VERSION, "MigrateCommit", body))
    assert info.value.reply_to == commit.msg_id


def test_validate_checks_before_sending():
    protocol.validate(Ping(sender_id="a"))
    with pytest.raises(ValidationError):
        protocol.validate(Ping(sender_id="no spaces allowed"))


def test_error_classes_have_distinct_codes():
    classes = [MalformedMessage, UnknownMessageType, VersionMismatch, MessageTooLarge, ValidationError, RequestTimeout]
    assert all(issubclass(c, ProtocolError) for c in classes + [RemoteError])
    assert len({c.code for c in classes}) == len(classes)
    assert {c.code for c in classes[:5]} <= {v for k, v in vars(protocol.ErrorCode).items() if k.isupper()}


def test_error_reply_from_errors():
    r = protocol.error_reply(VersionMismatch(2, 1, reply_to="m-3"))
    assert (r.code, r.reply_to) == ("version_mismatch", "m-3") and "version 2" in r.message
    r = protocol.error_reply(KeyError("boom"), reply_to="m-4")
    assert (r.code, r.reply_to) == ("internal", "m-4")
    assert decode(encode(r)) == r


# ---- deadlines -----------------------------------------------------------------------------------

def test_expired():
    assert not expired(Ping(sender_id="a"))  # default: 10 s from now
    assert expired(Ping(sender_id="a", deadline_ms=protocol.now_ms() - 1))
    assert not expired(Ping(sender_id="a", deadline_ms=protocol.now_ms() - 1), slack_ms=1000)
    assert not expired(TokenBatch(request_id="r", first_index=0, worker_id="w"))  # one-way: no deadline
    assert abs(Ping(sender_id="a", deadline_ms=protocol.deadline_in(2.0)).deadline_ms / 1000 - time.time() - 2) < 0.1
    assert 1.5 < protocol.remaining_s(Ping(sender_id="a", deadline_ms=protocol.deadline_in(2.0))) <= 2.0


# ---- tensor frames -------------------------------------------------------------------------------

def _blocks_header() -> MigrateBlocks:
    return MigrateBlocks(migration_id="mig-1", dst_block_ids=[3, 4])


def _address(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_tensor_frames_round_trip_zero_copy(dtype):
    k = (torch.randn(2, 3, 16, 8) * 50).to(dtype)
    v = (torch.randn(2, 3, 16, 8) * 50).to(dtype)
    frames = pack_tensor_frames(_blocks_header(), [k, v])
    assert len(frames) == 3
    # send side: the data frames are the tensors' own memory
    assert _address(frames[1]) == k.data_ptr() and _address(frames[2]) == v.data_ptr()
    header, (k2, v2) = unpack_tensor_frames(frames, MigrateBlocks)
    assert header.dst_block_ids == [3, 4] and header.tensors[0].shape == [2, 3, 16, 8]
    assert k2.dtype == dtype and torch.equal(k2, k) and torch.equal(v2, v)
    # receive side: tensors are views of the frame memory (zmq.Frame here, as received with copy=False)
    zframes = [zmq.Frame(bytes(f)) for f in frames]
    _, (k3, _) = unpack_tensor_frames(zframes, MigrateBlocks)
    assert k3.data_ptr() == _address(zframes[1].buffer) and torch.equal(k3, k)


def test_tensor_frames_edge_cases():
    empty = torch.empty(0, 4)
    scalar = torch.tensor(3.5)
    strided = torch.arange(20, dtype=torch.int64).reshape(4, 5)[:, ::2]  # non-contiguous: one copy
    frames = pack_tensor_frames(_blocks_header(), [empty, scalar, strided])
    _, (e, s, st) = unpack_tensor_frames([bytes(f) for f in frames])  # read-only bytes: copied, no warning
    assert e.shape == (0, 4) and s.item() == 3.5 and torch.equal(st, strided)
    with pytest.raises(TypeError, match="cannot travel"):
        pack_tensor_frames(_blocks_header(), [torch.zeros(2, dtype=torch.bool)])
    with pytest.raises(TypeError, match="no `tensors` field"):
        pack_tensor_frames(Ping(sender_id="a"), [torch.zeros(2)])


def test_tensor_frames_reject_mismatches():
    t = torch.zeros(4, 4)
    env, data = pack_tensor_frames(_blocks_header(), [t])
    with pytest.raises(MalformedMessage, match="needs 64"):
        unpack_tensor_frames([env, bytes(data)[:-1]])
    with pytest.raises(MalformedMessage, match="describes 1 tensors but 2"):
        unpack_tensor_frames([env, data, data])
    with pytest.raises(MalformedMessage, match="describes 1 tensors but 0"):
        unpack_tensor_frames([env])
    with pytest.raises(MessageTooLarge):
        unpack_tensor_frames([env, data], max_frame_bytes=63)
    with pytest.raises(MalformedMessage):
        unpack_tensor_frames([])
    body = body_of(MigrateBlocks(migration_id="m", dst_block_ids=[0],
                                 tensors=[protocol.TensorSpec(dtype="float32", shape=[1])]))
    body["tensors"] = [["bool", [1]]]  # a dtype outside the allow-list
    with pytest.raises(ValidationError, match="tensors"):
        unpack_tensor_frames([raw_envelope(PROTOCOL_VERSION, "MigrateBlocks", body), b"\x01"])


def test_tensor_frames_over_real_zmq():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        k = torch.randn(64, 1024).to(torch.bfloat16)  # 128 KiB: above pyzmq's copy threshold
        tracker = a.send_multipart(pack_tensor_frames(_blocks_header(), [k]), copy=False, track=True)
        parts = b.recv_multipart(copy=False)
        _, (got,) = unpack_tensor_frames(parts, MigrateBlocks)
        assert torch.equal(got, k) and got.data_ptr() == _address(parts[1].buffer)
        tracker.wait(5)
    finally:
        a.close(0), b.close(0), ctx.term()


def test_tensor_buffer_copies_only_when_needed():
    t = torch.arange(8, dtype=torch.float32)
    assert _address(tensor_buffer(t)) == t.data_ptr()
    assert _address(tensor_buffer(t[::2])) != t.data_ptr()


# ---- addresses -----------------------------------------------------------------------------------

def test_addresses_derive_from_one_config():
    a = ClusterAddresses()
    assert a.scheduler() == f"tcp://127.0.0.1:{a.base_port}"
    assert a.scheduler_bind() == a.scheduler()
    eps = {a.scheduler(), a.frontend_sdk(0), a.frontend_tokens(0), a.frontend_sdk(1)}
    eps |= {a.worker_control(i) for i in range(8)} | {a.worker_migration(i) for i in range(8)}
    assert len(eps) == 20  # all distinct
    remote = ClusterAddresses(host="10.0.0.5", bind_host="0.0.0.0", base_port=9000)
    assert remote.worker_migration(2) == "tcp://10.0.0.5:9105"
    assert remote.bind(remote.worker_migration(2)) == "tcp://0.0.0.0:9105"
    ipc = ClusterAddresses(transport="ipc", ipc_dir="/tmp/kvf")
    assert ipc.worker_control(1) == "ipc:///tmp/kvf/worker.1.control.sock"
    pinned = ClusterAddresses.from_dict({"overrides": {"scheduler": "tcp://127.0.0.1:6000"}})
    assert pinned.scheduler() == "tcp://127.0.0.1:6000" and pinned.worker_control(0).endswith(":17200")
    for bad in [dict(transport="udp"), dict(base_port=0), dict(overrides={"scheduler": "http://x"}), dict(nope=1)]:
        with pytest.raises(ValueError):
            ClusterAddresses.from_dict(bad)
    with pytest.raises(ValueError):
        ClusterAddresses(transport="ipc", ipc_dir="/tmp/" + "x" * 100).scheduler()


# ---- live sockets --------------------------------------------------------------------------------

MAX_BYTES = 64 << 10


@pytest.fixture
async def ctx():
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


async def _handler(rec: Received):
    msg = rec.msg
    if isinstance(msg, Ping):
        if msg.sender_id == "crash":
            raise RuntimeError("handler bug")
        if msg.sender_id.startswith("slow"):
            await asyncio.sleep(random.random() * 0.02)
        return Pong.to(msg, sender_id=f"server-{msg.sender_id}")
    return None


async def _raw_exchange(sock: zmq.asyncio.Socket, parts: list[bytes], timeout: float = 10.0) -> ErrorReply | Pong:
    await sock.send_multipart(parts)
    reply = await asyncio.wait_for(sock.recv_multipart(), timeout)
    return decode(reply[0])


async def test_router_survives_garbage_and_keeps_serving(ctx, caplog):
    server = MessageSocket.open(ctx, zmq.ROUTER, (Ping,), bind="tcp://127.0.0.1:0", max_bytes=MAX_BYTES,
                                name="test-router")
    endpoint = server.last_endpoint
    assert server.raw.getsockopt(zmq.MAXMSGSIZE) == MAX_BYTES and server.raw.getsockopt(zmq.LINGER) == 0
    task = asyncio.create_task(serve(server, _handler))
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(endpoint)
    try:
        with caplog.at_level(logging.WARNING, logger="kvferry.protocol"):
            reply = await _raw_exchange(raw, [os.urandom(100)])
            assert reply.code == "malformed" and reply.reply_to is None
            reply = await _raw_exchange(raw, [encode(Ping(sender_id="a"))[:-4]])
            assert reply.code == "malformed"
            reply = await _raw_exchange(raw, [raw_envelope(PROTOCOL_VERSION, "Bogus", {"msg_id": "q-1"})])
            assert (reply.code, reply.reply_to) == ("unknown_type", "q-1")
            reply = await _raw_exchange(raw, [raw_envelope(PROTOCOL_VERSION + 1, "Ping", {"msg_id": "q-2"})])
            assert (reply.code, reply.reply_to) == ("version_mismatch", "q-2")
            reply = await _raw_exchange(raw, [encode(TokenBatch(request_id="r", first_index=0, worker_id="w"))])
            assert reply.code == "unknown_type"  # a real type, but not for this socket
            wrong_type = raw_envelope(PROTOCOL_VERSION, "Ping", {"msg_id": "q-3", "sender_id": 5})
            reply = await _raw_exchange(raw, [wrong_type])
            assert (reply.code, reply.reply_to) == ("invalid", "q-3")
            reply = await _raw_exchange(raw, [encode(Ping(sender_id="a")), b"unexpected data frame"])
            assert reply.code == "malformed"
            crash = Ping(sender_id="crash")
            reply = await _raw_exchange(raw, [encode(crash)])
            assert (reply.code, reply.reply_to) == ("internal", crash.msg_id)
            late = Ping(sender_id="late", deadline_ms=protocol.now_ms() - 1000)
            reply = await _raw_exchange(raw, [encode(late)])
            assert (reply.code, reply.reply_to) == ("expired", late.msg_id)
        logged = [r for r in caplog.records if r.name == "kvferry.protocol"]
        assert {"MalformedMessage", "UnknownMessageType", "VersionMismatch", "ValidationError"} <= {
            getattr(r, "error_type", None) for r in logged}
        assert all("\n" not in r.getMessage() for r in logged if hasattr(r, "error_type"))

        # An oversized frame: ZeroMQ (MAXMSGSIZE) drops that connection; the server keeps serving.
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 0)
        big.connect(endpoint)
        await big.send_multipart([b"\x00" * (MAX_BYTES + 1)])
        assert await big.poll(300) == 0  # no reply: the message never reached the application
        big.close(0)

        client = MessageSocket.connect(ctx, zmq.DEALER, endpoint, (Pong, ErrorReply))
        pong = await request(client, Ping(sender_id="after"), timeout_s=2.0)
        assert isinstance(pong, Pong) and pong.sender_id == "server-after"
        with pytest.raises(RemoteError, match="RuntimeError: handler bug") as info:
            await request(client, Ping(sender_id="crash"), timeout_s=2.0)
        assert info.value.code == "internal"
        err = await request(client, Ping(sender_id="crash"), timeout_s=2.0, raise_errors=False)
        assert isinstance(err, ErrorReply)
        # the raw client that sent all the garbage still gets served too
        assert isinstance(await _raw_exchange(raw, [encode(Ping(sender_id="again"))]), Pong)
        client.close()
    finally:
        task.cancel()
        raw.close(0)
        server.close()


async def test_envelope_over_codec_limit_gets_too_large_reply(ctx):
    # MAXMSGSIZE allows big data frames, the envelope limit is smaller: the application answers.
    server = MessageSocket.open(ctx, zmq.ROUTER, (Ping,), bind="tcp://127.0.0.1:0", max_bytes=1024,
                                max_frame_bytes=1 << 20)
    task = asyncio.create_task(serve(server, _handler))
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.last_endpoint)
    try:
        reply = await _raw_exchange(raw, [b"\x00" * 2048])
        assert reply.code == "too_large"
        assert isinstance(await _raw_exchange(raw, [encode(Ping(sender_id="ok"))]), Pong)
    finally:
        task.cancel()
        raw.close(0)
        server.close()


async def test_request_timeout(ctx):
    silent = ctx.socket(zmq.ROUTER)  # receives, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    client = MessageSocket.connect(ctx, zmq.DEALER, f"tcp://127.0.0.1:{port}", (Pong, ErrorReply))
    try:
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout) as info:
            await request(client, Ping(sender_id="a"), timeout_s=0.2)
        # not before the timeout; the upper bound only tells a timeout from a hang (generous: loaded machines)
        assert 0.15 < time.monotonic() - t0 < 10.0
        assert isinstance(info.value, TimeoutError)
        # the deadline on the wire was lowered to the timeout
        parts = await asyncio.wait_for(silent.recv_multipart(), 1.0)
        sent = decode(parts[1])
        assert sent.deadline_ms <= protocol.now_ms() + 50
    finally:
        client.close()
        silent.close(0)
    # no peer at all: the send itself cannot complete
    lonely = MessageSocket.connect(ctx, zmq.DEALER, "tcp://127.0.0.1:1", (Pong,))
    with pytest.raises(RequestTimeout):
        await request(lonely, Ping(sender_id="a"), timeout_s=0.1)
    lonely.close()


async def test_requester_matches_concurrent_replies(ctx):
    server = MessageSocket.open(ctx, zmq.ROUTER, (Ping,), bind="tcp://127.0.0.1:0")
    task = asyncio.create_task(serve(server, _handler))
    client = MessageSocket.connect(ctx, zmq.DEALER, server.last_endpoint, (Pong, ErrorReply))
    unsolicited: list[object] = []
    try:
        async with Requester(client, on_message=lambda rec: unsolicited.append(rec.msg)) as req:
            names = [f"slow-{i}" for i in range(50)]
            replies = await asyncio.gather(*(req.request(Ping(sender_id=n), 10.0) for n in names))
            assert [r.sender_id for r in replies] == [f"server-{n}" for n in names]
            with pytest.raises(RemoteError):
                await request(req, Ping(sender_id="crash"), timeout_s=2.0)
            await req.send(Ping(sender_id="fire-and-forget"))  # its reply is unsolicited
            deadline = time.monotonic() + 30
            while not unsolicited:
                assert time.monotonic() < deadline, "the unsolicited reply never reached on_message"
                await asyncio.sleep(0.01)
            assert isinstance(unsolicited[0], Pong)
    finally:
        task.cancel()
        client.close()
        server.close()


async def test_a_cancelled_request_stays_cancelled_when_its_reply_arrives_at_the_same_moment(ctx):
    """A loop of requests (the scheduler's pinger) must stop when cancelled, even if the reply
    lands in the same event-loop turn: Python 3.11's asyncio.wait_for returned the reply instead
    (the loop went on, and a shutdown waiting for it hung)."""
    server = MessageSocket.open(ctx, zmq.ROUTER, (Ping,), bind="tcp://127.0.0.1:0")
    client = MessageSocket.connect(ctx, zmq.DEALER, server.last_endpoint, (Pong, ErrorReply))
    try:
        async with Requester(client) as req:
            rounds = 0

            async def pinger() -> None:
                nonlocal rounds
                while True:
                    await req.request(Ping(sender_id="p"), 10.0)
                    rounds += 1

            task = asyncio.create_task(pinger())
            deadline = time.monotonic() + 30
            while not req._pending:
                assert time.monotonic() < deadline, "the ping was never sent"
                await asyncio.sleep(0.01)
            (fut,) = req._pending.values()
            fut.set_result(Pong(reply_to="x", sender_id="s"))  # the reply and the cancel, in one turn
            task.cancel()
            await asyncio.wait([task], timeout=5.0)
            assert task.cancelled() and rounds == 0
    finally:
        client.close()
        server.close()


async def test_frames_through_message_sockets(ctx):
    server = MessageSocket.open(ctx, zmq.ROUTER, (MigrateBlocks,), bind="tcp://127.0.0.1:0",
                                max_frame_bytes=1 << 20, zero_copy=True)
    client = MessageSocket.connect(ctx, zmq.DEALER, server.last_endpoint, None)
    try:
        kv = torch.randn(4, 2, 16, 64).to(torch.bfloat16)
        await client.send_tensors(_blocks_header(), [kv], timeout_s=2.0)
        rec = await asyncio.wait_for(server.recv(), 2.0)
        (got,) = rec.tensors()
        assert torch.equal(got, kv) and rec.peer and rec.msg.tensors[0].dtype == "bfloat16"
        assert got.data_ptr() == _address(rec.frames[0].buffer)  # zero_copy socket: a view of the frame
        # a header whose specs do not match its frames is rejected when the tensors are built
        await client.send(_blocks_header(), frames=[b"1234"], timeout_s=2.0)
        rec = await asyncio.wait_for(server.recv(), 2.0)
        with pytest.raises(MalformedMessage):
            rec.tensors()
    finally:
        client.close()
        server.close()


async def test_serve_handles_urgent_messages_before_a_queued_burst():
    """serve(first=...) takes everything already queued and handles the urgent types first: the
    scheduler's dispatches do not wait behind a burst of load reports."""
    from protocol import Heartbeat, Ping, Pong

    ctx = zmq.asyncio.Context()
    try:
        # inproc: once a send returns, its message is in the server's queue (over TCP a sleep would
        # have to guess when all 51 arrived), so all 51 are queued before serving starts
        server = MessageSocket.open(ctx, zmq.ROUTER, allowed=(Heartbeat, Ping), bind="inproc://urgent-first",
                                    name="server")
        client = MessageSocket.connect(ctx, zmq.DEALER, "inproc://urgent-first", allowed=(Pong,))
        for i in range(50):
            await client.send(Heartbeat(sender_id="w", role="worker", seq=i))
        await client.send(Ping(sender_id="urgent"))
        order: list[str] = []

        async def handler(rec: Received):
            order.append(type(rec.msg).__name__)
            return Pong(reply_to=rec.msg.msg_id, sender_id="server") if isinstance(rec.msg, Ping) else None

        task = asyncio.create_task(serve(server, handler, first=(Ping,)))
        reply = await asyncio.wait_for(client.recv(), 30)
        assert isinstance(reply.msg, Pong)
        deadline = time.monotonic() + 30
        while len(order) < 51:  # the heartbeats after it
            assert time.monotonic() < deadline, order
            await asyncio.sleep(0.01)
        task.cancel()
        assert order[0] == "Ping" and order.count("Heartbeat") == 50
    finally:
        ctx.destroy(linger=0)
