"""`kvferry up` keeps serving when its processes die (services.supervisor), driven exactly as a user
runs it: the `kvferry up` command in a subprocess, clients on 127.0.0.1 (the SDK, the official
openai client), `kill -9` of its children found through /proc.

- kill -9 of a worker, of the scheduler and of the frontend under streaming load: every stream
  completes or ends with a clear error (never hangs), the cluster is back to full size and
  serving, and no KV block is left used on any worker;
- a worker that fails at every start (its control port is taken) is given up with one line while
  the others serve;
- a worker whose engine thread is stuck (a test-only hook blocks a step) reports unhealthy on
  /health, stops its watchdog pings, and is killed (its threads' stacks dumped) and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from protocol import SchedulerReplies, StatusReply, StatusRequest
from protocol.sockets import request_once
from sdk import AsyncClient, SdkError
from services.launcher import free_ports
from testkit.wait import until

pytestmark = pytest.mark.timeout(400)

ROOT = Path(__file__).resolve().parents[1]
BACK_WITHIN_S = 30.0  # the bound: back to full size and serving (generous for a loaded 2-core box)


class Up:
    """A `kvferry up` subprocess: its console lines collected on a thread, its children by role."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, workers: int = 2,
                 ports: tuple[int, int] | None = None) -> None:
        self.http, self.base = ports or free_ports(workers + 1)
        self.metrics = self.base + 150  # scheduler on P, worker i on P + 1 + i (inside free_ports' range)
        cmd = [sys.executable, "-m", "cli.main", "up", "--http-port", str(self.http), "--base-port", str(self.base),
               "--metrics-port", str(self.metrics), "--workers", str(workers), *args]
        self.stderr_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kvferry-up-{os.getpid()}-{self.base}.err"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=self._stderr, stdin=subprocess.DEVNULL, text=True, bufsize=1)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def sdk_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.base + 1}"

    def wait_line(self, needle: str, timeout: float, after: int = 0) -> str:
        """The first console line from index `after` on that contains `needle`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((ln for ln in self.lines[after:] if needle in ln), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._changed.wait(0.5)):
                    raise AssertionError(f"no line with {needle!r} within {timeout} s; console: {self.lines}\n"
                                         f"stderr tail: {self.stderr()[-3000:]}")
                self._changed.wait(min(left, 0.5))

    def stderr(self) -> str:
        if self._stderr.closed:
            return getattr(self, "final_stderr", "")
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def children(self) -> dict[str, list[int]]:
        """Running children by role (scheduler, frontend, worker) from /proc."""
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        roles: dict[str, list[int]] = {}
        for row in out.stdout.splitlines():
            pid, _, args = row.strip().partition(" ")
            for role in ("scheduler", "frontend", "worker"):
                if f"cli.main {role}" in args:
                    roles.setdefault(role, []).append(int(pid))
        return roles

    def stop(self) -> int | None:
        """SIGTERM, as a person's Ctrl-C / systemctl stop would; the exit status."""
        code = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._stderr.close()
        self.final_stderr = self.stderr_path.read_text(errors="replace")
        with contextlib.suppress(OSError):
            self.stderr_path.unlink()
        return code

    def explain(self) -> str:
        """The console and the end of stderr, for an assertion message."""
        err = getattr(self, "final_stderr", "")
        return "console:\n" + "\n".join(self.lines) + "\nstderr tail:\n" + "\n".join(
            ln for ln in err.splitlines()[-60:] if '"event"' not in ln or '"level": "error"' in ln)


async def status(up: Up, timeout: float = 2.0) -> StatusReply:
    return await request_once(f"tcp://127.0.0.1:{up.base}", StatusRequest(), SchedulerReplies, timeout)


async def wait_status(up: Up, pred, timeout: float, what: str) -> StatusReply:  # noqa: ANN001
    last: object = None

    async def matching() -> StatusReply | None:
        nonlocal last
        try:
            last = await status(up)
            return last if pred(last) else None
        except Exception as exc:  # noqa: BLE001 - the scheduler may be restarting: ask again
            last = exc
            return None

    return await until(matching, timeout, lambda: f"{what}; last status: {last!r}", step_s=0.2)


def full_and_idle(names: set[str]):  # noqa: ANN201
    """Every worker of `names` registered and alive, none holding a block or a request."""
    def pred(st: StatusReply) -> bool:
        live = {i.worker_id: i for i in st.instances if i.alive}
        return set(live) >= names and not st.requests and all(
            live[n].free_blocks == live[n].total_blocks and live[n].num_running == live[n].num_waiting == 0
            for n in names)
    return pred


async def sdk_stream(sdk: AsyncClient, prompt: str, max_tokens: int, started: asyncio.Queue) -> list[int] | SdkError:
    """One SDK stream's tokens (gapless), or the SdkError it ended with."""
    toks: list[int] = []
    try:
        async with contextlib.aclosing(sdk.stream(prompt, max_tokens=max_tokens, ignore_eos=True)) as chunks:
            async for ch in chunks:
                assert ch.first_index == len(toks) or not ch.token_ids, (ch.first_index, len(toks))
                if not toks and ch.token_ids:
                    await started.put(ch.request_id)
                toks.extend(ch.token_ids)
    except SdkError as exc:
        return exc
    return toks


async def http_stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> int | Exception:
    """One openai completions stream: the tokens it got (its final usage), or the error it ended with."""
    n = 0
    try:
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
    except (openai.APIError, httpx.HTTPError) as exc:
        return exc
    return n


async def until_running(up: Up, count: int, timeout: float = 60.0) -> StatusReply:
    return await wait_status(up, lambda s: sum(1 for r in s.requests if r.running) >= count, timeout,
                             f"{count} streams running")


# ---- kill -9 of every kind of process ---------------------------------------------------------------

LONG = 1500  # tiny tokens: a stream outlives a kill, its detection and the resumption


async def test_kill_9_of_worker_scheduler_and_frontend_under_streaming_load():
    up = Up(["--engine", "torch", "--model", "tiny", "--dtype", "float32", "--num-blocks", "1024"], workers=3)
    workers = {"worker-0", "worker-1", "worker-2"}
    try:
        up.wait_line("kvferry is up: 3 workers", 180)
        http = openai.AsyncOpenAI(base_url=f"{up.http_url}/v1", api_key="x", timeout=300, max_retries=0)

        # -- a worker: its streams resume elsewhere with every token, it comes back under its own id
        async with AsyncClient(up.sdk_endpoint, timeout=300) as sdk:
            started: asyncio.Queue = asyncio.Queue()
            streams = [asyncio.ensure_future(sdk_stream(sdk, f"worker kill {i}", LONG, started)) for i in range(6)]
            https = [asyncio.ensure_future(http_stream(http, f"http {i}", LONG)) for i in range(3)]
            for _ in streams:
                await asyncio.wait_for(started.get(), 120)
            st = await until_running(up, 9)
            counts = {w: sum(1 for r in st.requests if r.worker_id == w) for w in workers}
            victim = max(counts, key=counts.__getitem__)
            old = next(i for i in st.instances if i.worker_id == victim)
            mark = len(up.lines)
            os.kill(old.pid, signal.SIGKILL)
            up.wait_line(f"{victim} exited with status -9 (SIGKILL); restarted (attempt ", 30, after=mark)
            got = await asyncio.wait_for(asyncio.gather(*streams), 300)
            http_got = await asyncio.wait_for(asyncio.gather(*https), 300)
        for toks in got:  # resumed by recompute on a survivor: complete, gapless (checked while streaming)
            assert isinstance(toks, list) and len(toks) == LONG, toks
        assert http_got == [LONG] * 3, http_got
        st = await wait_status(up, full_and_idle(workers), BACK_WITHIN_S, "the killed worker back, nothing held")
        back = next(i for i in st.instances if i.worker_id == victim)
        assert back.pid != old.pid and back.registered_ms > old.registered_ms

        # -- the scheduler: streams go on; the restarted one rebuilds its view from registrations
        async with AsyncClient(up.sdk_endpoint, timeout=300) as sdk:
            started = asyncio.Queue()
            streams = [asyncio.ensure_future(sdk_stream(sdk, f"scheduler kill {i}", 1500, started)) for i in range(4)]
            for _ in streams:
                await asyncio.wait_for(started.get(), 120)
            mark = len(up.lines)
            (sched,) = up.children()["scheduler"]
            os.kill(sched, signal.SIGKILL)
            up.wait_line("scheduler exited with status -9 (SIGKILL); restarted (attempt ", 30, after=mark)
            got = await asyncio.wait_for(asyncio.gather(*streams), 300)
            assert [len(t) for t in got if isinstance(t, list)] == [1500] * 4, got
            await wait_status(up, full_and_idle(workers), BACK_WITHIN_S, "every worker registered again")
            after = await sdk.generate("after the scheduler", max_tokens=8, ignore_eos=True)
            assert len(after.token_ids) == 8

        # -- the frontend: its clients get a clear error at once; the workers free its requests
        async with AsyncClient(up.sdk_endpoint, timeout=300) as sdk:
            started = asyncio.Queue()
            streams = [asyncio.ensure_future(sdk_stream(sdk, f"frontend kill {i}", 8000, started)) for i in range(3)]
            https = [asyncio.ensure_future(http_stream(http, f"frontend http {i}", 8000)) for i in range(3)]
            for _ in streams:
                await asyncio.wait_for(started.get(), 120)
            await until_running(up, 6)
            mark = len(up.lines)
            (fe,) = up.children()["frontend"]
            os.kill(fe, signal.SIGKILL)
            # no hang: each ends well before its 8000 tokens, with the client library's error
            got = await asyncio.wait_for(asyncio.gather(*streams), 60)
            http_got = await asyncio.wait_for(asyncio.gather(*https), 60)
            up.wait_line("frontend exited with status -9 (SIGKILL); restarted (attempt ", 30, after=mark)
            for r in got:
                assert isinstance(r, SdkError) and r.code == "unavailable" and "frontend" in r.message, r
            assert all(isinstance(r, Exception) for r in http_got), http_got
            await wait_status(up, full_and_idle(workers), BACK_WITHIN_S, "the dead frontend's requests aborted")
            # the same endpoints serve again (the client reconnects by itself)
            deadline = time.monotonic() + BACK_WITHIN_S
            while True:
                try:
                    r = await http.completions.create(model="tiny", prompt="back", max_tokens=4,
                                                      extra_body={"ignore_eos": True})
                    break
                except (openai.APIConnectionError, openai.InternalServerError):
                    assert time.monotonic() < deadline, "the restarted frontend does not serve"
                    await asyncio.sleep(0.2)
            assert r.usage.completion_tokens == 4
            assert len((await sdk.generate("sdk back", max_tokens=4, ignore_eos=True)).token_ids) == 4
        await http.close()
        await wait_status(up, full_and_idle(workers), BACK_WITHIN_S, "nothing held at the end")
        assert up.children().keys() == {"scheduler", "frontend", "worker"} and len(up.children()["worker"]) == 3
    finally:
        code = up.stop()
    assert code == 0, up.explain()  # a clean stop after all that


# ---- a crash-looping worker, and a stuck one ---------------------------------------------------------

async def test_crash_looping_worker_is_given_up_and_a_stuck_engine_is_restarted(tmp_path):
    hang = tmp_path / "hang"
    env = {"KVFERRY_TEST_ENGINE_HANG_FILE": str(hang), "KVFERRY_WORKER_WATCHDOG_S": "2",
           "KVFERRY_SUPERVISOR_WATCHDOG_S": "3", "KVFERRY_SUPERVISOR_START_LIMIT_BURST": "2",
           "KVFERRY_SUPERVISOR_RESTART_DELAY_S": "0.2"}
    up = None
    http, base = free_ports(4)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + 104))  # worker-2's control port: it fails at every start
        squatter.listen()
        try:
            up = Up(["--engine", "sim", "--model", "llama7b-a10"], env=env, workers=3, ports=(http, base))
            # worker-2: first start and 2 restarts fail, then one line gives it up; the others serve
            line = up.wait_line("error: worker-2 exited with status 1; giving up on it", 120)
            assert "2 restarts within 60 s" in line
            up.wait_line("kvferry is up: 2 workers", 120)
            await wait_status(up, full_and_idle({"worker-0", "worker-1"}), BACK_WITHIN_S, "two workers serve")

            # a stuck engine step: the worker that steps next takes the hang
            hang.touch()
            mark = len(up.lines)
            async with AsyncClient(up.sdk_endpoint, timeout=120) as sdk:
                started: asyncio.Queue = asyncio.Queue()
                task = asyncio.ensure_future(sdk_stream(sdk, "stuck", 400, started))
                deadline = time.monotonic() + 30
                while hang.exists():
                    assert time.monotonic() < deadline, "no engine step took the hang"
                    await asyncio.sleep(0.05)
                # /health turns 503 with the reason while the process is still there
                unhealthy = None
                async with httpx.AsyncClient(timeout=5) as probe:
                    deadline = time.monotonic() + 20
                    while unhealthy is None and time.monotonic() < deadline:
                        for i in (0, 1):
                            with contextlib.suppress(httpx.HTTPError):
                                r = await probe.get(f"http://127.0.0.1:{up.metrics + 1 + i}/health")
                                if r.status_code == 503 and "engine step running" in r.json().get("reason", ""):
                                    unhealthy = f"worker-{i}"
                        await asyncio.sleep(0.2)
                assert unhealthy is not None, "no worker reported its stuck engine on /health"
                up.wait_line(f"error: {unhealthy} sent no watchdog ping for 3 s", 30, after=mark)
                up.wait_line(f"{unhealthy} exited with status -6 (SIGABRT); restarted (attempt 1", 30, after=mark)
                result = await asyncio.wait_for(task, 120)  # resumed on the other worker, or a clear error
                assert isinstance(result, SdkError) or len(result) == 400, result
            await wait_status(up, full_and_idle({"worker-0", "worker-1"}), BACK_WITHIN_S, "the stuck worker back")
            async with httpx.AsyncClient(timeout=5) as probe:
                idx = int(unhealthy.rsplit("-", 1)[1])
                assert (await probe.get(f"http://127.0.0.1:{up.metrics + 1 + idx}/health")).status_code == 200
            err = up.stderr()
            assert "_test_hang" in err and "engine_driver.py" in err  # faulthandler's dump of the stuck thread
            assert not any("giving up" in ln for ln in up.lines[mark:])
        finally:
            code = up.stop() if up is not None else None
    assert up is not None and code == 0, up.explain() if up is not None else ""
