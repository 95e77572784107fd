"""Live migration between workers (design §5): invariants and every abort path.

Workers run in this process on real sockets (tests/migration_harness.py). Invariants checked in
every test: a migrated request produces exactly the tokens of an unmigrated twin (greedy and
seeded sampling; float32 so that batch composition cannot flip a token), the frontend receives
each output index exactly once, and afterwards every worker's blocks are all free again (the
engines run their integrity check after every step).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import zmq

from protocol import (
    AbortRequest,
    Ack,
    CancelMigration,
    ErrorCode,
    ErrorReply,
    MigrateBlocks,
    MigrateReserve,
    Ping,
    Pong,
    ReserveReply,
    encode,
)
from protocol.sockets import MessageSocket, request
from protocol.to_worker import WorkerMigrationReplies
from testkit.wait import until
from tests.migration_harness import MigrationCluster

F32 = {"dtype": "float32"}
PROMPT = [random.Random(7).randrange(1, 250) for _ in range(70)]


@pytest.fixture
async def make_cluster():
    made: list[MigrationCluster] = []

    async def make(n: int = 2, **kw) -> MigrationCluster:  # noqa: ANN003
        c = MigrationCluster(n, {**F32, **kw.pop("overrides", {})}, **kw)
        made.append(c)
        return await c.start()

    try:
        yield make
    finally:
        for c in made:
            await c.close()


def hold(dest, name: str) -> tuple[asyncio.Event, asyncio.Event]:  # noqa: ANN001
    """Hold the destination's handler `name` (_reserve, _blocks, _commit) until `gate` is set;
    `entered` is set when a message reached it."""
    gate, entered = asyncio.Event(), asyncio.Event()
    orig = getattr(dest, name)

    async def held(rec):  # noqa: ANN001
        entered.set()
        await gate.wait()
        return await orig(rec)

    setattr(dest, name, held)
    return gate, entered


async def twins(c: MigrationCluster, rid: str, max_tokens: int, **sampling) -> None:  # noqa: ANN003
    """`rid` and its unmigrated twin `rid-ref` on worker 0."""
    await c.add(0, f"{rid}-ref", PROMPT, max_tokens, **sampling)
    await c.add(0, rid, PROMPT, max_tokens, **sampling)


async def check_twins(c: MigrationCluster, rid: str) -> list[int]:
    fe = c.frontend
    await fe.finished(rid)
    await fe.finished(f"{rid}-ref")
    got, ref = fe.tokens(rid), fe.tokens(f"{rid}-ref")
    assert got == ref, f"{rid}: migrated tokens differ from the unmigrated run"
    assert fe.finish[rid].finish_reason == "length"
    assert not fe.duplicates, fe.duplicates
    assert not fe.extra_finals, fe.extra_finals
    return got


# ---- invariants ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["shm", "frames"])
async def test_migrated_requests_continue_with_identical_tokens(make_cluster, path):
    c = await make_cluster(2, overrides={"migration_path": path})
    fe = c.frontend
    # right after prefill (greedy, seeded) and late in decoding (greedy). The early ones are long
    # enough that a slow machine does not finish them before their migration commits (60 tokens did,
    # once: aborted, reason "finished").
    await twins(c, "early-greedy", 240)
    await twins(c, "early-seeded", 240, temperature=1.0, seed=1234)
    await twins(c, "late", 400)
    await fe.until(lambda: fe.count("early-greedy") >= 1 and fe.count("early-seeded") >= 1)
    for rid in ("early-greedy", "early-seeded"):
        res = await c.migrate_and_wait(0, 1, rid)
        assert res.outcome == "committed", res
        # The second finds the prompt's blocks cached at worker 1 (the first one's moved KV): not sent.
        assert res.blocks + res.blocks_skipped >= len(PROMPT) // 16 and res.bytes_moved > 0 and res.stages >= 2
        assert res.blocks_skipped == (0 if rid == "early-greedy" else len(PROMPT) // 16), res
    await fe.until(lambda: fe.count("late") >= 250)
    res = await c.migrate_and_wait(0, 1, "late")
    assert res.outcome == "committed", res
    for rid in ("early-greedy", "early-seeded", "late"):
        await check_twins(c, rid)
        assert fe.senders[rid] == ["worker-0", "worker-1"]
        assert [m.worker_id for m in fe.moved if m.request_id == rid] == ["worker-1"]
    assert c.frontend.finish["late"].worker_id == "worker-1"
    await c.wait_idle()
    m = c.workers[0].migration.metrics
    assert m.value("kvferry_migrations_committed_total", role="out") == 3
    assert m.value("kvferry_migration_bytes_total", path=path) > 0
    assert c.workers[1].migration.metrics.value("kvferry_migrations_committed_total", role="in") == 3


async def test_back_and_forth_across_four_workers(make_cluster):
    c = await make_cluster(4)
    fe = c.frontend
    # long enough to outlive six hops (each ~6 tokens and a migration: well under a second in all)
    await twins(c, "hop", 1000, temperature=0.8, seed=99)
    route = [1, 2, 0, 3, 1, 0]
    where = 0
    for dst in route:
        start = fe.count("hop")
        await fe.until(lambda s=start: fe.count("hop") >= s + 6)  # decode a few tokens between hops
        res = await c.migrate_and_wait(where, dst, "hop")
        assert res.outcome == "committed", res
        where = dst
    await check_twins(c, "hop")
    assert fe.senders["hop"] == ["worker-0", "worker-1", "worker-2", "worker-0", "worker-3", "worker-1", "worker-0"]
    await c.wait_idle()


async def test_long_context_moves_in_many_chunks_and_stages(make_cluster):
    # Chunks of 2 blocks: a 900-token context is ~30 chunks; one block per stage may stay behind.
    c = await make_cluster(2, overrides={"migration_chunk_bytes": 2 * 16 * 2 * 2 * 2 * 32 * 4,
                                         "migration_final_blocks": 0, "max_num_batched_tokens": 256})
    long_prompt = [random.Random(3).randrange(1, 250) for _ in range(900)]
    # 1,200 tokens to go: the ~30-chunk migration must end before the request does, on a loaded machine too
    await c.add(0, "long-ref", long_prompt, 1200)
    await c.add(0, "long", long_prompt, 1200)
    await c.frontend.until(lambda: c.frontend.count("long") >= 2)
    res = await c.migrate_and_wait(0, 1, "long")
    assert res.outcome == "committed" and res.blocks >= 900 // 16 and res.bytes_moved > 30 * 2 * 2048, res
    assert res.stages >= 2
    # 1,200 tokens each: longer than the sink's default wait when other tests share the two cores.
    await c.frontend.finished("long", timeout=180)
    await c.frontend.finished("long-ref", timeout=180)
    assert c.frontend.tokens("long") == c.frontend.tokens("long-ref")
    await c.wait_idle()


async def test_blocking_and_recompute_baselines_give_identical_tokens(make_cluster):
    c = await make_cluster(2)
    fe = c.frontend
    await twins(c, "stop-copy", 300, temperature=1.0, seed=3)
    await twins(c, "recompute", 300, temperature=1.0, seed=4)
    await fe.until(lambda: fe.count("stop-copy") >= 20 and fe.count("recompute") >= 20)
    blocking = await c.migrate_and_wait(0, 1, "stop-copy", mode="blocking")
    assert blocking.outcome == "committed" and blocking.stages == 1 and blocking.bytes_moved > 0, blocking
    recompute = await c.migrate_and_wait(0, 1, "recompute", mode="recompute")
    assert recompute.outcome == "committed" and recompute.blocks == 0 and recompute.bytes_moved == 0, recompute
    for rid in ("stop-copy", "recompute"):
        await check_twins(c, rid)
        assert fe.senders[rid] == ["worker-0", "worker-1"]
    await c.wait_idle()


async def test_a_waiting_request_is_moved_without_kv(make_cluster):
    c = await make_cluster(2, per_worker={0: {"max_num_seqs": 1}})
    fe = c.frontend
    await c.add(0, "busy", PROMPT, 120)
    await fe.until(lambda: fe.count("busy") >= 1)
    await c.add(0, "queued", PROMPT, 30, temperature=0.7, seed=5)  # waits behind "busy"
    res = await c.migrate_and_wait(0, 1, "queued")
    assert res.outcome == "committed" and res.blocks == 0 and res.bytes_moved == 0, res
    await fe.finished("queued")
    assert fe.senders["queued"] == ["worker-1"]
    await c.add(1, "queued-ref", PROMPT, 30, temperature=0.7, seed=5)
    await fe.finished("queued-ref")
    assert fe.tokens("queued") == fe.tokens("queued-ref")
    await fe.finished("busy")
    await c.wait_idle()


async def test_source_picks_lowest_priority_then_shortest(make_cluster):
    c = await make_cluster(2)
    await c.add(0, "important", PROMPT, 200, priority=0)
    await c.add(0, "minor-long", PROMPT + PROMPT, 200, priority=5)
    await c.add(0, "minor-short", PROMPT, 200, priority=5)
    await c.frontend.until(lambda: all(c.frontend.count(r) >= 1 for r in ("important", "minor-long", "minor-short")))
    mid, reply = await c.migrate(0, 1, None)
    assert isinstance(reply, Ack) and reply.detail == "minor-short", reply
    assert (await c.result(mid)).outcome == "committed"
    for rid in ("important", "minor-long", "minor-short"):
        await c.call(0 if rid != "minor-short" else 1, AbortRequest(request_id=rid))
    await c.wait_idle()


# ---- abort paths: the request keeps running exactly once, nothing leaks ----------------------------

async def test_request_finishing_on_the_source_aborts_the_migration(make_cluster):
    c = await make_cluster(2)
    gate, entered = hold(c.workers[1].migration.destination, "_reserve")
    await twins(c, "short", 12)
    await c.frontend.until(lambda: c.frontend.count("short") >= 1)
    mid, reply = await c.migrate(0, 1, "short")
    assert isinstance(reply, Ack), reply
    await entered.wait()
    await c.frontend.finished("short")  # it ends on the source while the destination is held
    gate.set()
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "finished", res
    await check_twins(c, "short")
    assert c.frontend.senders["short"] == ["worker-0"]
    await c.wait_idle()


async def test_preemption_on_the_source_aborts_the_migration(make_cluster):
    c = await make_cluster(2)
    gate, entered = hold(c.workers[1].migration.destination, "_blocks")
    await twins(c, "victim", 60)
    await c.frontend.until(lambda: c.frontend.count("victim") >= 3)
    mid, _ = await c.migrate(0, 1, "victim")
    await entered.wait()

    def preempt(e):  # noqa: ANN001, ANN202 - what the scheduler does when memory runs out
        e.scheduler._preempt(e.requests["victim"])

    await c.workers[0].driver.call(preempt)
    gate.set()
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "preempted", res
    await check_twins(c, "victim")
    await c.wait_idle()


async def test_destination_without_room_refuses(make_cluster):
    c = await make_cluster(2, per_worker={1: {"num_blocks": 3}})
    await twins(c, "big", 30)
    await c.frontend.until(lambda: c.frontend.count("big") >= 1)
    res = await c.migrate_and_wait(0, 1, "big")
    assert res.outcome == "aborted" and res.reason.startswith("no_room"), res
    await check_twins(c, "big")
    await c.wait_idle()
    assert c.workers[1].migration.metrics.value("kvferry_migrations_aborted_total", role="in", reason="no_room") == 1


async def test_destination_dying_mid_migration_leaves_the_request_on_the_source(make_cluster):
    c = await make_cluster(2, overrides={"migration_timeout_s": 1.0})
    dst = c.workers[1].migration
    gate, entered = hold(dst.destination, "_blocks")
    await twins(c, "orphan", 80)
    await c.frontend.until(lambda: c.frontend.count("orphan") >= 2)
    mid, _ = await c.migrate(0, 1, "orphan")
    await entered.wait()
    for t in dst._tasks:  # the destination's migration socket goes silent, as a killed process's would
        t.cancel()
    dst.sock.close()
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "timeout", res
    await check_twins(c, "orphan")
    assert c.frontend.senders["orphan"] == ["worker-0"]
    # The silent destination's reservation is not freed by anyone here (its sweeper was killed
    # with it): only the source side is checked.
    assert await c.used_blocks(0) == 0
    gate.set()


async def test_source_dying_mid_migration_frees_the_reservation_after_the_timeout(make_cluster):
    c = await make_cluster(2, overrides={"migration_timeout_s": 1.0})
    dst = c.workers[1]
    sock = MessageSocket.connect(c.ctx, zmq.DEALER, dst.migration_endpoint, WorkerMigrationReplies, name="dying-src")
    try:
        reply = await request(sock, MigrateReserve(
            migration_id="ghost", request_id="ghost-req", src_worker_id="worker-9", stage=0, num_blocks=10,
            block_size=16, kv_bytes_per_block=dst.info.kv_bytes_per_block, kv_dtype="float32", src_host="elsewhere"),
            5.0, raise_errors=False)
        assert isinstance(reply, ReserveReply) and reply.ok and len(reply.block_ids) == 10, reply
        assert reply.path == "frames"  # another host: frames
        assert await c.used_blocks(1) == 10
        # ... and the source goes silent: the sweeper frees the blocks after migration_timeout_s
        await c.wait_idle(timeout=20.0)
        assert dst.migration.metrics.value("kvferry_migrations_aborted_total", role="in", reason="timeout") == 1
    finally:
        sock.close()


async def test_a_different_kv_block_layout_is_refused(make_cluster):
    """A vLLM worker's blocks (same size here) must not land in kvferry's cache, nor the reverse."""
    c = await make_cluster(2)
    dst = c.workers[1]
    sock = MessageSocket.connect(c.ctx, zmq.DEALER, dst.migration_endpoint, WorkerMigrationReplies, name="vllm-src")
    try:
        reply = await request(sock, MigrateReserve(
            migration_id="other", request_id="other-req", src_worker_id="worker-9", stage=0, num_blocks=2,
            block_size=16, kv_bytes_per_block=dst.info.kv_bytes_per_block, kv_dtype="float32",
            kv_layout="vllm:2x32x64", src_host="elsewhere"), 5.0, raise_errors=False)
        assert isinstance(reply, ReserveReply) and not reply.ok and reply.reason.startswith("layout"), reply
        assert await c.used_blocks(1) == 0
    finally:
        sock.close()


async def test_frontend_abort_during_migration(make_cluster):
    c = await make_cluster(2)
    gate, entered = hold(c.workers[1].migration.destination, "_blocks")
    await c.add(0, "gone", PROMPT, 200)
    await c.frontend.until(lambda: c.frontend.count("gone") >= 2)
    mid, _ = await c.migrate(0, 1, "gone")
    await entered.wait()
    abort = asyncio.ensure_future(c.call(0, AbortRequest(request_id="gone", reason="client left")))
    # the source has taken the abort (it cancels the held migration) before the destination goes on
    source = c.workers[0].migration.source
    deadline = asyncio.get_running_loop().time() + 20
    while getattr(source.by_id.get(mid), "cancel_reason", None) is None and not abort.done():
        assert asyncio.get_running_loop().time() < deadline, "the abort never reached the source"
        await asyncio.sleep(0.01)
    gate.set()
    reply = await abort
    assert isinstance(reply, Ack) and reply.ok, reply
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "aborted", res
    fin = await c.frontend.finished("gone")
    assert fin.finish_reason == "abort" and fin.worker_id == "worker-0"
    await c.wait_idle()


def hold_reply(dest, name: str) -> tuple[asyncio.Event, asyncio.Event]:  # noqa: ANN001
    """Like `hold`, but the handler runs first and its reply waits at `gate`; `entered` is set
    once the handler has run (for _reserve: the blocks are reserved, the reply not sent)."""
    gate, entered = asyncio.Event(), asyncio.Event()
    orig = getattr(dest, name)

    async def held(rec):  # noqa: ANN001
        reply = await orig(rec)
        entered.set()
        await gate.wait()
        return reply

    setattr(dest, name, held)
    return gate, entered


@pytest.mark.parametrize("where", ["reserved, reply held", "reserve held"])
async def test_frontend_abort_before_the_reserve_reply_frees_the_destination_at_once(make_cluster, where):
    """The source gives up while its opening MigrateReserve is unanswered (seen across hosts: a
    stream aborted by its client as a drain began). Its MigrateAbort frees a reservation made
    meanwhile, or, overtaking the reserve (aborts are served first), has that reserve refused:
    nothing waits for the sweeper (`migration_timeout_s`, long here)."""
    c = await make_cluster(2, overrides={"migration_timeout_s": 60.0})
    dst = c.workers[1].migration.destination
    gate, entered = (hold_reply if where.startswith("reserved") else hold)(dst, "_reserve")
    await c.add(0, "gone", PROMPT, 400)
    await c.frontend.until(lambda: c.frontend.count("gone") >= 2)
    mid, _ = await c.migrate(0, 1, "gone")
    await entered.wait()
    reply = await c.call(0, AbortRequest(request_id="gone", reason="client left"))
    assert isinstance(reply, Ack) and reply.ok, reply
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "aborted", res
    if where == "reserve held":  # the abort is in; now the reserve it overtook
        await until(lambda: mid in dst.aborted_early, 10, "the abort ahead of its reserve")
    gate.set()
    await c.wait_idle(timeout=10.0)
    assert c.workers[1].migration.metrics.value("kvferry_migrations_aborted_total", role="in", reason="source") == 1


async def test_scheduler_cancel_keeps_the_request_on_the_source(make_cluster):
    c = await make_cluster(2)
    gate, entered = hold(c.workers[1].migration.destination, "_blocks")
    await twins(c, "stay", 60)
    await c.frontend.until(lambda: c.frontend.count("stay") >= 2)
    mid, _ = await c.migrate(0, 1, "stay")
    await entered.wait()
    reply = await c.call(0, CancelMigration(migration_id=mid))
    assert isinstance(reply, Ack) and reply.ok, reply
    gate.set()
    res = await c.result(mid)
    assert res.outcome == "aborted" and res.reason == "cancelled", res
    unknown = await c.call(0, CancelMigration(migration_id="nope"))
    assert isinstance(unknown, Ack) and not unknown.ok
    await check_twins(c, "stay")
    await c.wait_idle()


async def test_unanswered_commit_is_taken_back_and_the_request_runs_once(make_cluster):
    # The commit itself gets 2 s before the source gives up on its answer (a slow machine once took
    # over 1 s: the source took the request back before the destination had announced itself).
    c = await make_cluster(2, overrides={"migration_timeout_s": 2.0})
    dest = c.workers[1].migration.destination
    orig = dest._commit

    async def slow_commit(rec):  # noqa: ANN001 - commits, then answers too late
        reply = await orig(rec)
        await asyncio.sleep(3.0)
        return reply

    dest._commit = slow_commit
    await twins(c, "limbo", 60)
    await c.frontend.until(lambda: c.frontend.count("limbo") >= 2)
    res = await c.migrate_and_wait(0, 1, "limbo")
    assert res.outcome == "aborted" and res.reason == "commit_timeout", res
    fe = c.frontend
    await fe.finished("limbo")
    await fe.finished("limbo-ref")
    # The destination streamed tokens until it dropped its copy (or finished it): the stream has
    # the same values as the unmigrated run, whoever sent each index; the source announced
    # itself as the owner again.
    assert fe.tokens("limbo") == fe.tokens("limbo-ref")
    # The source's take-back notice went out. It travels on the source's token socket, the
    # migration's result on its scheduler link: the result can be read first, so wait for the
    # notice. (It is usually the last notice; on a slow machine the destination's own, sent with
    # its first tokens, can arrive after it: notices carry no epoch yet, a known gap.)
    await fe.until(lambda: "worker-0" in [m.worker_id for m in fe.moved if m.request_id == "limbo"],
                   what="the source's take-back notice (RequestMoved from worker-0)")
    assert all(b.finish_reason == "length" for b in fe.extra_finals)
    await c.wait_idle()


async def test_concurrency_limits(make_cluster):
    c = await make_cluster(3, overrides={"max_migrations_out": 1, "max_migrations_in": 1})
    gate, entered = hold(c.workers[1].migration.destination, "_blocks")
    for rid in ("a", "b"):
        await c.add(0, rid, PROMPT, 200)
    await c.add(2, "c", PROMPT, 200)
    await c.frontend.until(lambda: all(c.frontend.count(r) >= 1 for r in "abc"))
    mid, _ = await c.migrate(0, 1, "a")
    await entered.wait()
    _, busy = await c.migrate(0, 2, "b")
    assert isinstance(busy, ErrorReply) and busy.code == ErrorCode.OVERLOADED, busy
    mid_c, reply = await c.migrate(2, 1, "c")  # worker 1 already takes one
    assert isinstance(reply, Ack)
    res_c = await c.result(mid_c)
    assert res_c.outcome == "aborted" and res_c.reason == "busy", res_c
    _, again = await c.migrate(0, 1, "a")
    assert isinstance(again, ErrorReply) and again.code in (ErrorCode.REFUSED, ErrorCode.OVERLOADED)
    gate.set()
    assert (await c.result(mid)).outcome == "committed"
    for i, rid in ((1, "a"), (0, "b"), (2, "c")):
        assert isinstance(await c.call(i, AbortRequest(request_id=rid)), Ack)
    await c.wait_idle()


async def test_hostile_migration_messages_are_refused_and_the_worker_keeps_serving(make_cluster):
    c = await make_cluster(2)
    dst = c.workers[1]
    raw = c.ctx.socket(zmq.DEALER)
    raw.connect(dst.migration_endpoint)
    sock = MessageSocket(raw, WorkerMigrationReplies, name="hostile")
    try:
        # unknown migration
        r = await request(sock, MigrateBlocks(migration_id="nope", dst_block_ids=[0]), 5.0, raise_errors=False)
        assert isinstance(r, ErrorReply) and r.code == ErrorCode.NOT_FOUND, r
        # wrong layout
        r = await request(sock, MigrateReserve(migration_id="m-lay", request_id="x", src_worker_id="w9", num_blocks=1,
                                               block_size=32, kv_bytes_per_block=1), 5.0, raise_errors=False)
        assert isinstance(r, ReserveReply) and not r.ok and r.reason.startswith("layout"), r
        # a real reservation, then blocks outside it (a running request's blocks, say)
        await c.add(1, "victim", PROMPT, 200)
        await c.frontend.until(lambda: c.frontend.count("victim") >= 1)
        r = await request(sock, MigrateReserve(migration_id="m-h", request_id="x", src_worker_id="w9", num_blocks=2,
                                               block_size=16, kv_bytes_per_block=dst.info.kv_bytes_per_block,
                                               kv_dtype="float32", src_host="elsewhere"), 5.0, raise_errors=False)
        assert isinstance(r, ReserveReply) and r.ok, r
        victim_blocks = await dst.driver.call(lambda e: e.block_table("victim"))
        r2 = await request(sock, MigrateBlocks(migration_id="m-h", dst_block_ids=victim_blocks[:1]), 5.0,
                           raise_errors=False)
        assert not r2.ok and "reservation" in r2.reason, r2
        # data of the wrong size, or none, for reserved blocks
        for frames in ([b"x" * 100], []):
            r2 = await request(sock, MigrateBlocks(migration_id="m-h", dst_block_ids=r.block_ids), 5.0,
                               frames=frames, raise_errors=False)
            assert not r2.ok and "write failed" in r2.reason, r2
        # garbage envelopes
        for frames in ([b"\x00"], [b"\x93\x01\xa4Nope\x80"], [encode(Ping(sender_id="t")), b"x" * 100]):
            await sock.raw.send_multipart(frames)
        pong = await request(sock, Ping(sender_id="t"), 5.0, raise_errors=False)
        assert isinstance(pong, Pong)
    finally:
        sock.close()
    # the victim is intact: it finishes with the tokens of a clean run on the other worker
    await c.add(0, "victim-ref", PROMPT, 200)
    await c.frontend.finished("victim", timeout=60)
    await c.frontend.finished("victim-ref", timeout=60)
    assert c.frontend.tokens("victim") == c.frontend.tokens("victim-ref")
    await c.wait_idle(timeout=10)  # the hostile reservation is freed by the sweeper


async def test_worker_metrics_endpoint_counts_migrations(make_cluster):
    import httpx

    from services.launcher import free_port_block

    base = free_port_block(2)  # worker i serves /metrics at metrics_port + i
    ports = [base, base + 1]
    c = await make_cluster(2, overrides={"metrics_port": base})
    await twins(c, "counted", 200)
    await c.frontend.until(lambda: c.frontend.count("counted") >= 2)
    assert (await c.migrate_and_wait(0, 1, "counted")).outcome == "committed"
    async with httpx.AsyncClient(timeout=10) as http:
        src = (await http.get(f"http://127.0.0.1:{ports[0]}/metrics")).text
        dst = (await http.get(f"http://127.0.0.1:{ports[1]}/metrics")).text
    assert 'kvferry_migrations_started_total{role="out"} 1.0' in src
    assert 'kvferry_migrations_committed_total{role="out"} 1.0' in src
    assert 'kvferry_migration_bytes_total{path="shm"}' in src
    assert "kvferry_migration_downtime_seconds_count 1.0" in src
    assert "kvferry_migration_stages_count 1.0" in src
    assert 'kvferry_migrations_committed_total{role="in"} 1.0' in dst
    await check_twins(c, "counted")
    await c.wait_idle()


# ---- prefix-aware transfer ------------------------------------------------------------------------

LONG_PROMPT = [(i * 29) % 250 + 3 for i in range(320)]  # 20 full blocks of 16


async def test_a_destination_caching_the_prompt_gets_only_the_private_blocks(make_cluster):
    """Worker 1 served the same prompt before, so its prefix cache holds the prompt's blocks; a
    request with that prompt migrated there from worker 0 sends only the blocks after them (its
    generated tokens' blocks), and continues with the same tokens as an unmigrated twin. Then, the
    same move to a worker that caches nothing sends every block."""
    c = await make_cluster(3)
    fe = c.frontend
    bs = 16
    await c.add(1, "warm", LONG_PROMPT, 4)  # fills worker 1's cache with the prompt's full blocks
    await fe.finished("warm")
    for rid in ("cached", "cold"):
        await c.add(0, f"{rid}-ref", LONG_PROMPT, 120)
        await c.add(0, rid, LONG_PROMPT, 120)
    await fe.until(lambda: fe.count("cached") >= 40 and fe.count("cold") >= 40)
    hot = await c.migrate_and_wait(0, 1, "cached")
    cold = await c.migrate_and_wait(0, 2, "cold")
    assert hot.outcome == cold.outcome == "committed", (hot, cold)
    prompt_blocks = len(LONG_PROMPT) // bs
    # The prompt's full blocks were linked at the destination (the last prompt token's block is
    # computed by the prefill like any other, so all 20 are cached there).
    assert hot.blocks_skipped >= prompt_blocks - 1, hot
    assert cold.blocks_skipped == 0 and cold.blocks >= prompt_blocks, cold
    # Sent: at most the request's private blocks (those past the prompt) + 1.
    total = (len(LONG_PROMPT) + fe.count("cached")) // bs + 1
    assert hot.blocks <= total - prompt_blocks + 1, hot
    assert hot.bytes_moved < cold.bytes_moved / 2, (hot.bytes_moved, cold.bytes_moved)
    for rid in ("cached", "cold"):
        await check_twins(c, rid)
    await c.wait_idle()
    m = c.workers[0].migration.metrics
    assert m.value("kvferry_migration_blocks_skipped_total") == hot.blocks_skipped

    def integrity(e):  # noqa: ANN001, ANN202
        e.check_integrity()
        return e.stats().num_cached_blocks

    for w in c.workers:
        assert await w.driver.call(integrity) > 0  # shared blocks were released into the cache, not leaked
