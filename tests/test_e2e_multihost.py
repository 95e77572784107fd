"""Several hosts for real: Linux network namespaces on a bridge (testkit.hosts), each service in
its own UTS namespace with its host's name, started with the systemd units' command lines and a
per-host copy of deploy/kvferry.toml (`[cluster] host` / `bind_host` / `http_host` = the host's
address, `[cluster.overrides] scheduler` = host A's). CurveZMQ on (`kvferry keys generate`).

    host A (10.213.0.16k+1): scheduler, frontend    the test (root namespace, 10.213.0.16k+14):
    host B (10.213.0.16k+2): two torch `tiny` workers  openai / SDK clients, `kvferry ctl`, raw ZeroMQ
    host C (10.213.0.16k+3): one torch `tiny` worker   (k: the run's address slot, testkit.netns)

One cluster for the module, restored between tests (links up, killed services started again,
drains undone, every worker idle), so one failing test does not fail the next. (`make test`
hands xdist whole files, `--dist loadfile`, so the module runs on one worker and builds one
cluster; `xdist_group` does not work with pytest 9.2 and xdist 3.8: xdist sets `item._nodeid`,
which pytest no longer reads.) Checks: every socket binds its host's address
only; dispatch reaches both worker hosts; `ctl migrate` B→B moves KV through shared memory and
B→C through ZeroMQ frames (the workers' per-path byte counters), without changing greedy
output; draining B's workers moves everything to C, output unchanged; `kill -9` of C's worker
resumes its stream on B with the same tokens; a 10 s partition of C resumes its stream on B,
then C registers again, aborts the copy it no longer owns, holds no block and serves again; a
peer without keys gets nothing from any endpoint across the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import zmq
import zmq.asyncio

from protocol import Ping, Pong, StatusReply, StatusRequest, encode
from protocol.sockets import MessageSocket, request
from protocol.to_scheduler import DrainInstance, UndrainInstance
from sdk import AsyncClient, curve_keys_from_dir
from testkit.hosts import KVFERRY, MultiHost, scrape
from testkit.netns import NetnsUnavailable, check_available, netns_names
from testkit.wait import until
from tests.test_e2e_failures import collect

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
LAYOUT = {"a": ["scheduler", "frontend"], "b": ["worker", "worker"], "c": ["worker"]}
WORKER = {"engine": "torch", "model": MODEL, "device": "cpu", "dtype": "float32", "num_blocks": 1024,
          "max_num_seqs": 16, "threads": 1,
          # Longer than the partition: C cannot drop its stream because the frontend fell silent,
          # so only the frontend's abort of what C no longer owns can free it (the rejoin check).
          "frontend_timeout_s": 30.0}
# "load": no load-balancing migrations, so only the tests move requests (deploy's kvferry would too).
SCHEDULER = {"policy": "load"}
FRONTEND = {"model": MODEL}
# Tokens (the tiny model makes ~460 a second alone, `kvferry ctl` takes seconds to start on a
# loaded machine): a stream outlives two `ctl migrate` round trips, or a drain and the moves it starts.
MIGRATE_LONG = 5000
DRAIN_LONG = 3000
KILL_LONG = 1200
# The partition: C's stream is resumed on B while C, cut off, keeps generating it (max_tokens
# beyond what C makes in the partition; the test ends the stream once it has checked C).
PARTITION_LONG = 8000
PARTITION_S = 10.0
Prompt = tuple[str, float, int | None]  # (text, temperature, seed), as tests.test_e2e_failures.references takes them
DRAIN_PROMPTS: list[Prompt] = [("Once upon a time", 0.0, None), ("In the beginning", 0.0, None),
                               ("Dear diary", 0.0, None)]
KILL_PROMPT: Prompt = ("The old lighthouse keeper", 0.0, None)


# ---- the cluster -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def namespaces() -> None:
    """Skips the module where network namespaces cannot be made (not root, no `ip`, ...)."""
    try:
        check_available()
    except NetnsUnavailable as exc:
        pytest.skip(f"no network namespaces here: {exc}")


@pytest.fixture(scope="module")
def mh(namespaces: None, tmp_path_factory: pytest.TempPathFactory):
    m = MultiHost(LAYOUT, tmp_path_factory.mktemp("multihost"), worker=WORKER, scheduler=SCHEDULER,
                  frontend=FRONTEND, env={"KVFERRY_WORKER_DEVICE": "cpu"}, curve=True)
    m.open()
    try:
        yield m
    finally:
        m.close()
        assert not m.leftovers(), m.leftovers()
        assert not [ns for ns in netns_names() if ns.startswith(m.net.prefix + "-")]


@pytest.fixture(scope="module", autouse=True)
def references(namespaces: None) -> Any:
    """The undisturbed greedy tokens of the SDK streams below, computed in this process in one
    batch (a thread, from before the cluster starts): `await references(prompt, n)`."""
    from tests.test_e2e_failures import references as compute

    prompts = [*DRAIN_PROMPTS, KILL_PROMPT]
    longest = max(DRAIN_LONG, KILL_LONG)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="references")
    future: Future[list[list[int]]] = pool.submit(compute, prompts, longest)

    async def get(prompt: Prompt, n: int) -> list[int]:
        return (await asyncio.wrap_future(future))[prompts.index(prompt)][:n]  # greedy: a prefix of the longer run

    yield get
    pool.shutdown(wait=True)


@pytest.fixture
async def cluster(mh: MultiHost, request: pytest.FixtureRequest):
    """The module's cluster, whole and idle before and after each test whatever the test did; the
    services' log tails are printed when the test failed."""
    failed = request.session.testsfailed
    await restore(mh)
    try:
        yield mh
    finally:
        if request.session.testsfailed > failed:
            print(f"\n===== service logs ({mh.log_dir})\n{mh.tails()}")
        await restore(mh)


async def restore(mh: MultiHost) -> None:
    for host in mh.hosts:
        if not mh.net.link_is_up(host):
            mh.link_up(host)
    for name, s in mh.services.items():
        if not s.running():
            await asyncio.to_thread(mh.respawn, name)
    workers = sorted(mh.worker_ids())
    st = await wait_status(mh, lambda s: sorted(i.worker_id for i in s.instances if i.alive) == workers, 60,
                           "every worker registered and alive")
    for i in st.instances:
        if i.draining:
            await mh.ask(UndrainInstance(worker_id=i.worker_id))
    async with httpx.AsyncClient(timeout=5) as http:
        async def healthy() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return (await http.get(f"{mh.http_url}/health")).status_code == 200
            return False
        await until(healthy, 60, "the frontend's /health 200", step_s=0.2)
    await wait_status(mh, lambda s: idle(s, workers), 90, "every worker alive, undrained and idle")


def idle(st: StatusReply, workers: list[str]) -> bool:
    live = sorted(i.worker_id for i in st.instances if i.alive)
    return live == workers and not st.requests and all(
        not i.draining and i.free_blocks == i.total_blocks and i.num_running == 0 and i.num_waiting == 0
        for i in st.instances if i.alive)


# ---- talking to it -----------------------------------------------------------------------------------

async def wait_status(mh: MultiHost, pred: Callable[[StatusReply], bool], timeout: float, what: str) -> StatusReply:
    last: object = None

    async def matching() -> StatusReply | None:
        nonlocal last
        try:
            reply: StatusReply = await mh.ask(StatusRequest(), timeout=2.0)
        except Exception as exc:  # noqa: BLE001 - e.g. the scheduler's host is cut off: ask again
            last = exc
            return None
        last = reply
        return reply if pred(reply) else None

    return await until(matching, timeout, lambda: f"{what}; last status: {last!r}", step_s=0.1)


def ctl(mh: MultiHost, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`kvferry ctl ARGS` from the root namespace, across the bridge, with the client keys."""
    return subprocess.run([KVFERRY, "ctl", *args, "--scheduler", mh.scheduler_endpoint, "--curve-keys",
                           str(mh.keys_dir)], capture_output=True, text=True, timeout=timeout, check=False)


async def ctl_migrate(mh: MultiHost, worker_rid: str, dst: str) -> None:
    """`kvferry ctl migrate --wait`, asked again while the scheduler's view lags behind a move."""
    for _ in range(10):
        out = await asyncio.to_thread(ctl, mh, "migrate", worker_rid, "--to", dst, "--wait", "30")
        if out.returncode == 0 or not any(w in out.stderr for w in ("not_found", "already migrating")):
            break
        await asyncio.sleep(0.3)
    assert out.returncode == 0, out.stdout + out.stderr


async def locate(mh: MultiHost, client_rid: str) -> tuple[str, str] | None:
    """(the id workers know the request by, its worker) as the scheduler lists it."""
    st = await mh.ask(StatusRequest())
    for r in st.requests:
        if r.request_id in client_rid or client_rid in r.request_id:
            return r.request_id, r.worker_id
    return None


def path_bytes(mh: MultiHost, *worker_ids: str) -> dict[str, float]:
    """KV bytes the workers sent by migration, per data path (their sum)."""
    pages = [scrape(mh.metrics_url(w)) for w in worker_ids]
    return {p: sum(m.get(f'kvferry_migration_bytes_total{{path="{p}"}}', 0.0) for m in pages)
            for p in ("shm", "frames")}


def openai_client(mh: MultiHost) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mh.http_url}/v1", api_key="x", timeout=300, max_retries=0)


async def openai_stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, ids: asyncio.Queue | None = None,
                        cache_salt: str | None = None, out: list[str] | None = None) -> tuple[str, int]:
    """A greedy streamed completion (ignore_eos): its text and completion tokens (the usage
    chunk); its id goes to `ids` with the first chunk, its chunks' text to `out` as they come."""
    extra: dict[str, Any] = {"ignore_eos": True}
    if cache_salt:
        extra["cache_salt"] = cache_salt
    s = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    text: list[str] = [] if out is None else out
    tokens = 0
    async for chunk in s:
        if ids is not None:
            await ids.put(chunk.id)
            ids = None
        text.append(chunk.choices[0].text if chunk.choices else "")
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


def sdk_client(mh: MultiHost) -> AsyncClient:
    return AsyncClient(mh.sdk_endpoint, timeout=300, **curve_keys_from_dir(str(mh.keys_dir)))


@contextlib.asynccontextmanager
async def only_on(mh: MultiHost, host: str):
    """New requests go to `host`'s workers only: every other worker drained (none runs anything
    here), undrained on leaving."""
    others = [w for w in mh.worker_ids() if mh.services[w].host.name != host]
    for w in others:
        await mh.ask(DrainInstance(worker_id=w))
    try:
        yield
    finally:
        for w in others:
            await mh.ask(UndrainInstance(worker_id=w))


def worker_events(mh: MultiHost, name: str, event: str) -> list[dict[str, Any]]:
    """The structured log events named `event` in service `name`'s log (JSON lines on stderr)."""
    out = []
    for line in mh.services[name].err_path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("event") == event:
                    out.append(ev)
    return out


def resumed_on(mh: MultiHost, rid: str) -> str | None:
    """The worker the frontend's log says it resumed request `rid` on (its `request.resumed` event)."""
    for line in mh.services["frontend"].err_path.read_text(errors="replace").splitlines():
        if '"request.resumed"' in line:
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if ev.get("request_id") and (ev["request_id"] in rid or rid in ev["request_id"]):
                    return str(ev.get("worker_id"))
    return None


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of each TCP socket that process `pid` listens on (its own namespace's
    /proc/PID/net/tcp: the host's sockets, not the test's)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = parts[1].split(":")
            raw = bytes.fromhex(addr)
            ip = (socket.inet_ntop(socket.AF_INET, raw[::-1]) if len(raw) == 4 else
                  socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
            out.append((ip, int(port, 16)))
    return out


# ---- the tests ----------------------------------------------------------------------------------------

async def test_every_service_binds_its_host_and_dispatch_reaches_both_worker_hosts(cluster: MultiHost):
    mh = cluster
    # Each service listens on its own host's address only (nothing on 127.0.0.1 or 0.0.0.0).
    for name, s in mh.services.items():
        assert s.proc is not None
        found = listening(s.proc.pid)
        assert found and {a for a, _ in found} == {s.host.address}, (name, found)
    # `kvferry ctl status --json` from the root namespace: every worker registered with its host's
    # name and announced its host's endpoints.
    out = await asyncio.to_thread(ctl, mh, "status", "--json")
    assert out.returncode == 0, out.stderr
    instances = {i["worker_id"]: i for i in json.loads(out.stdout)["instances"]}
    assert sorted(instances) == sorted(mh.worker_ids())
    for wid, i in instances.items():
        host = mh.services[wid].host
        assert i["host"] == host.hostname and i["alive"], i
        assert (i["endpoints"]["control"], i["endpoints"]["migration"]) == mh.worker_endpoints(wid), i

    # Concurrent requests spread over the three idle workers ("load": the freest): both hosts serve
    # (each worker logs the requests it was given).
    client = openai_client(mh)
    ids: asyncio.Queue = asyncio.Queue()
    prompts = [f"Dispatch check {k}:" for k in range(6)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*(openai_stream(client, p, 64, ids) for p in prompts)), 240)
    finally:
        await client.close()
    assert [n for _, n in results] == [64] * len(prompts)
    rids = [ids.get_nowait() for _ in prompts]
    served = {w: [e["request_id"] for e in worker_events(mh, w, "request.added")] for w in mh.worker_ids()}
    where = {rid: [w for w, got in served.items() if any(rid in r or r in rid for r in got)] for rid in rids}
    assert all(len(ws) == 1 for ws in where.values()), where
    assert {mh.services[ws[0]].host.name for ws in where.values()} == {"b", "c"}, where


async def test_ctl_migrate_uses_shm_within_a_host_and_frames_across_hosts(cluster: MultiHost):
    mh = cluster
    b0, b1 = mh.worker_ids("b")
    (c0,) = mh.worker_ids("c")
    client = openai_client(mh)
    ids: asyncio.Queue = asyncio.Queue()
    prompt = "The ferry crossed the strait"
    async with only_on(mh, "b"):
        task = asyncio.ensure_future(openai_stream(client, prompt, MIGRATE_LONG, ids))
        rid = await asyncio.wait_for(ids.get(), 60)
    # The unmigrated twin: its own cache salt, so no destination holds the migrated stream's blocks.
    twin = asyncio.ensure_future(openai_stream(client, prompt, MIGRATE_LONG, cache_salt="twin"))
    moves = []
    try:
        for step in ("shm", "frames"):
            # (the scheduler lists a request once its worker reported it: ask again for a moment)
            found = await until(lambda: locate(mh, rid), 30, f"{rid} listed by the scheduler", step_s=0.05)
            assert found is not None and found[1] in (b0, b1), f"{rid} is not on host b: {found}"
            worker_rid, src = found
            dst = (b1 if src == b0 else b0) if step == "shm" else c0
            before = path_bytes(mh, b0, b1)
            await ctl_migrate(mh, worker_rid, dst)
            assert (await locate(mh, rid)) == (worker_rid, dst)
            after = path_bytes(mh, b0, b1)  # summed over host B: robust to a move from the other worker
            other = "frames" if step == "shm" else "shm"
            moves.append((src, dst, step, after[step] - before[step]))
            assert after[step] > before[step], f"{src} -> {dst}: no {step} bytes ({before} -> {after})"
            assert after[other] == before[other], f"{src} -> {dst}: {other} bytes moved ({before} -> {after})"
        text = await asyncio.wait_for(task, 240)
        ref = await asyncio.wait_for(twin, 240)
    finally:
        for t in (task, twin):
            t.cancel()
        await asyncio.gather(task, twin, return_exceptions=True)
        await client.close()
    assert text[1] == MIGRATE_LONG and text == ref, "the migrated stream differs from its unmigrated twin"
    print("migrations:", moves)


async def test_draining_host_b_moves_every_stream_to_host_c(cluster: MultiHost, references: Any):
    mh = cluster
    b_workers = mh.worker_ids("b")
    (c0,) = mh.worker_ids("c")
    started: asyncio.Queue = asyncio.Queue()
    async with sdk_client(mh) as sdk:
        async with only_on(mh, "b"):
            tasks = [asyncio.ensure_future(collect(sdk, p, DRAIN_LONG, started=started)) for p, _, _ in DRAIN_PROMPTS]
            rids = [await asyncio.wait_for(started.get(), 60) for _ in DRAIN_PROMPTS]
        try:
            st = await mh.ask(StatusRequest())
            assert {r.worker_id for r in st.requests} <= set(b_workers), st.requests
            # Both of B's workers at once (so nothing settles on B), asked of the scheduler directly: a
            # `kvferry ctl drain` would start seconds later on a loaded machine, and an unloaded one
            # can finish a stream meanwhile. Then wait, as `ctl drain --wait` does, until B's workers
            # report no requests.
            await asyncio.gather(*(mh.ask(DrainInstance(worker_id=w)) for w in b_workers))
            await wait_status(mh, lambda s: all(i.alive and i.draining and i.num_running == i.num_waiting == 0
                                                for i in s.instances if i.worker_id in b_workers),
                              120, "host B's workers drained")
            got = [await asyncio.wait_for(t, 240) for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    # Every stream moved to C by live migration and finished there; a move between B's two workers
    # (one drain can start before the other) went through shared memory, every move to C through
    # ZeroMQ frames.
    committed = await until(lambda: (ids := {e["request_id"] for e in worker_events(mh, c0, "migration.committed_in")}
                                     ) >= set(rids) and ids, 30, f"{rids} committed on {c0}")
    finished = {e["request_id"]: e["tokens"] for e in worker_events(mh, c0, "request.finished")}
    assert all(finished.get(rid) == DRAIN_LONG for rid in rids), (rids, committed, finished)
    dst = {e["migration_id"]: e["dst_worker_id"] for w in b_workers for e in worker_events(mh, w, "migration.started")}
    moves = [(dst[e["migration_id"]], e["path"]) for w in b_workers for e in worker_events(mh, w, "migration.ended")
             if e["request_id"] in rids and e["outcome"] == "committed"]
    assert {p for d, p in moves if d == c0} == {"frames"} and {p for d, p in moves if d != c0} <= {"shm"}, moves
    for prompt, toks in zip(DRAIN_PROMPTS, got):
        assert toks == await references(prompt, DRAIN_LONG), f"{prompt[0]!r}: drained stream differs"


async def test_kill_9_of_host_c_worker_resumes_its_stream_on_host_b(cluster: MultiHost, references: Any):
    mh = cluster
    b_workers = mh.worker_ids("b")
    (c0,) = mh.worker_ids("c")
    started: asyncio.Queue = asyncio.Queue()
    async with sdk_client(mh) as sdk:
        async with only_on(mh, "c"):
            task = asyncio.ensure_future(collect(sdk, KILL_PROMPT[0], KILL_LONG, started=started))
            rid = await asyncio.wait_for(started.get(), 60)
        try:
            assert (await locate(mh, rid) or ("", ""))[1] == c0
            mh.kill(c0)
            got = await asyncio.wait_for(task, 240)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert resumed_on(mh, rid) in b_workers, f"{rid}: no request.resumed on host b in the frontend's log"
    assert got == await references(KILL_PROMPT, KILL_LONG), "the resumed stream differs from an undisturbed run"


async def test_partitioned_host_c_loses_its_stream_then_rejoins_clean(cluster: MultiHost):
    mh = cluster
    b_workers = mh.worker_ids("b")
    (c0,) = mh.worker_ids("c")
    client = openai_client(mh)
    ids: asyncio.Queue = asyncio.Queue()
    text: list[str] = []
    registered_ms = next(i.registered_ms for i in (await mh.ask(StatusRequest())).instances if i.worker_id == c0)
    async with only_on(mh, "c"):
        task = asyncio.ensure_future(openai_stream(client, "Across the water", PARTITION_LONG, ids, out=text))
        rid = await asyncio.wait_for(ids.get(), 60)
    try:
        assert (await locate(mh, rid) or ("", ""))[1] == c0
        down_at = time.monotonic()
        mh.link_down("c")
        try:
            # The scheduler declares C dead, the frontend resumes the stream on host B, where it goes on.
            await until(lambda: resumed_on(mh, rid) in b_workers, 30, f"{rid} resumed on host b", step_s=0.1)
            resumed_at = len(text)
            await until(lambda: len(text) > resumed_at, 30, "tokens from host b", step_s=0.05)
            await asyncio.sleep(max(0.0, PARTITION_S - (time.monotonic() - down_at)))  # the partition's length
        finally:
            mh.link_up("c")
        # C registers again (a new registration), is told to abort the copy it still runs (the abort
        # sent at the resumption reached it past its deadline) and ends up holding no block.
        await wait_status(mh, lambda s: any(i.worker_id == c0 and i.alive and i.registered_ms > registered_ms
                                            for i in s.instances), 60, f"{c0} registered again")
        aborted = await until(lambda: [e for e in worker_events(mh, c0, "request.aborted") if e["request_id"] == rid],
                              60, f"{rid} aborted on {c0}")
        assert aborted[0]["reason"] == "resumed on another worker", aborted
        await wait_status(mh, lambda s: any(i.worker_id == c0 and i.used_blocks == 0 and i.num_running == 0
                                            for i in s.instances) and not [r for r in s.requests if r.worker_id == c0],
                          60, f"{c0} idle")
        m = scrape(mh.metrics_url(c0))
        assert m.get("kvferry_worker_used_blocks") == 0 and m.get("kvferry_worker_running_requests") == 0, m
        assert m.get("kvferry_worker_registered") == 1, m
        if task.done():  # B may have finished it meanwhile: every token, none twice
            assert task.result()[1] == PARTITION_LONG
        task.cancel()  # else the client goes: the frontend aborts the stream on B
        await asyncio.gather(task, return_exceptions=True)
        await wait_status(mh, lambda s: not s.requests, 60, "no request left")
        # C serves again: with host B drained, a new request runs there.
        async with only_on(mh, "c"):
            r = await client.completions.create(model=MODEL, prompt="Back again", max_tokens=8, temperature=0.0,
                                                extra_body={"ignore_eos": True})
        assert r.usage is not None and r.usage.completion_tokens == 8
        assert any(r.id in e["request_id"] or e["request_id"] in r.id for e in worker_events(mh, c0, "request.added"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_peer_without_keys_gets_nothing_across_the_link(cluster: MultiHost):
    mh = cluster
    routers = {"scheduler": (mh.scheduler_endpoint, "scheduler"), "frontend SDK": (mh.sdk_endpoint, "frontend")}
    for w in mh.worker_ids():
        control, migration = mh.worker_endpoints(w)
        routers[f"{w} control"] = (control, "worker")
        routers[f"{w} migration"] = (migration, "worker")
    plain = zmq.asyncio.Context()

    async def probe(endpoint: str, kind: int, deadline_s: float = 3.0) -> dict[str, int]:
        """A socket without Curve: count its monitor's events and the replies within the deadline."""
        sock = plain.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        mon = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                      | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        seen = {"connected": 0, "handshake_ok": 0, "handshake_failed": 0, "replies": 0}
        sock.connect(endpoint)
        end = time.monotonic() + deadline_s
        with contextlib.suppress(zmq.Again):
            await sock.send(encode(Ping(sender_id="intruder")), flags=zmq.NOBLOCK)
        try:
            while (left := end - time.monotonic()) > 0:
                poller = zmq.asyncio.Poller()
                poller.register(mon, zmq.POLLIN)
                if kind == zmq.DEALER:
                    poller.register(sock, zmq.POLLIN)
                for s, _ in await poller.poll(int(left * 1000)):
                    if s is mon:
                        from zmq.utils.monitor import parse_monitor_message
                        ev = parse_monitor_message(await mon.recv_multipart())["event"]
                        key = ("connected" if ev == zmq.EVENT_CONNECTED else "handshake_ok"
                               if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED else "handshake_failed")
                        seen[key] += 1
                    else:
                        await sock.recv()
                        seen["replies"] += 1
        finally:
            sock.disable_monitor()
            mon.close(linger=0)
            sock.close(linger=0)
        return seen

    try:
        names = list(routers) + ["frontend tokens"]
        results = await asyncio.gather(*(probe(ep, zmq.DEALER) for ep, _ in routers.values()),
                                       probe(mh.tokens_endpoint, zmq.PUSH))
    finally:
        plain.destroy(linger=0)
    for name, seen in zip(names, results):
        # The TCP connection crosses the bridge (so the silence is not a dead link); no handshake, no reply.
        assert seen["connected"] >= 1 and seen["handshake_ok"] == 0 and seen["replies"] == 0, (name, seen)
        assert seen["handshake_failed"] >= 1, (name, seen)

    # The same endpoints answer a peer with the client keys, and the cluster still serves.
    from protocol.security import load_keys, use_curve

    trusted = zmq.asyncio.Context()
    use_curve(trusted, load_keys(str(mh.keys_dir), "client"))
    try:
        async def ping(endpoint: str, role: str) -> bool:
            s = MessageSocket.connect(trusted, zmq.DEALER, endpoint, None, server_role=role)
            try:
                return isinstance(await request(s, Ping(sender_id="probe"), timeout_s=10.0), Pong)
            finally:
                s.close()
        assert all(await asyncio.gather(*(ping(ep, role) for ep, role in routers.values())))
    finally:
        trusted.destroy(linger=0)
    client = openai_client(mh)
    try:
        r = await client.completions.create(model=MODEL, prompt="Still serving", max_tokens=8, temperature=0.0,
                                            extra_body={"ignore_eos": True})
        assert r.usage is not None and r.usage.completion_tokens == 8
    finally:
        await client.close()
