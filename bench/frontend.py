"""`kvferry bench frontend`: what one frontend sustains, with sim workers (no model compute).

Starts a scheduler, --workers sim workers (latency profile `instant`: a flat 1 ms step, no KV
limit worth the name) and one frontend on free 127.0.0.1 ports, then measures:

1. short requests/s: --concurrency keep-alive connections each sending non-streaming
   POST /v1/completions (--prompt-len prompt token ids, max_tokens=1) back to back for
   --duration seconds; requests/s, latency p50/p99, errors (any non-200 answer).
2. streamed tokens/s: --streams concurrent SSE streams (max_tokens=--stream-tokens, ignore_eos),
   restarted as they finish until --duration is over; the in-flight ones then finish, and
   tokens/s = completion tokens received (the streams' `usage`) / wall time from first request
   to last [DONE]. The same through the SDK's ZeroMQ endpoint (sdk.AsyncClient), counting the
   token ids of each chunk as it arrives.
3. dispatch latency: a separate scheduler process with --instances fake registered workers that
   keep reporting load (bench.scheduler.measure_dispatch_latency), one dispatch at a time.

The HTTP client is a minimal asyncio HTTP/1.1 keep-alive client (a few tens of microseconds of
CPU per request, far less than httpx), run in --client-procs processes. Each phase reports the CPU
the frontend process, the workers, the scheduler and the clients used (in cores), and the whole
machine's busy cores, so a figure limited by the client or by other load shows as such.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

TARGETS = {"requests_per_s": 1000.0, "streamed_tokens_per_s": 50000.0, "dispatch_p99_ms": 1.0}


@dataclass
class Options:
    """`kvferry bench frontend`'s settings (the flags, same names; their defaults are the CLI's)."""

    json: str | None
    duration: float
    concurrency: int
    streams: int
    stream_tokens: int
    prompt_len: int
    workers: int
    client_procs: int
    instances: int
    dispatch_requests: int
    skip: str  # comma-separated phases to skip: short,stream,sdk,dispatch


# ---- machine and CPU accounting --------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["processor"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
    return info


_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (0.0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / _TICK


class CpuMeter:
    """CPU cores used by named process groups and by the whole machine between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.m0 = machine_busy_s()
        self.c0 = {g: sum(proc_cpu_s(p) for p in pids) for g, pids in self.groups.items()}

    def stop(self, client_cpu_s: float) -> dict[str, float]:
        dt = max(1e-9, time.monotonic() - self.t0)
        out = {f"{g}_cores": round((sum(proc_cpu_s(p) for p in pids) - self.c0[g]) / dt, 2)
               for g, pids in self.groups.items()}
        out["client_cores"] = round(client_cpu_s / dt, 2)
        machine = (machine_busy_s() - self.m0) / dt
        out["other_cores"] = round(max(0.0, machine - sum(out.values())), 2)  # the rest of the machine
        out["machine_busy_cores"] = round(machine, 2)
        return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# ---- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------

class HttpConn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _ensure(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, dict[str, str]]:
        await self._ensure()
        assert self.writer is not None and self.reader is not None
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n" % (path.encode(), self.host.encode(), self.port, len(body)) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    async def body(self, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        return b"".join([c async for c in self.chunks()])

    async def chunks(self):  # noqa: ANN201 - async iterator of bytes (chunked transfer encoding)
        assert self.reader is not None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            yield data[:-2]


async def _short_client(host: str, port: int, conns: int, duration: float, prompt_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    lat: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + duration

    async def one(i: int) -> None:
        conn = HttpConn(host, port)
        body = json.dumps({"model": "tiny", "prompt": [rng.randrange(3, 256) for _ in range(prompt_len)],
                           "max_tokens": 1, "temperature": 0}).encode()
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    status, headers = await conn.post("/v1/completions", body)
                    data = await conn.body(headers)
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    await asyncio.sleep(0.01)
                    continue
                if status != 200:
                    errors.append(f"{status}: {data[:200].decode(errors='replace')}")
                    if headers.get("connection") == "close":
                        conn.close()
                    continue
                lat.append(time.perf_counter() - t0)
        finally:
            conn.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(one(i) for i in range(conns)))
    return {"latencies": lat, "errors": errors, "cpu_s": time.process_time() - cpu0}


async def _stream_client(host: str, port: int, conns: int, duration: float, prompt_len: int, max_tokens: int,
                         seed: int) -> dict:
    rng = random.Random(seed)
    tokens = 0
    events = 0
    streams = 0
    errors: list[str] = []
    end = time.monotonic() + duration
    last_done = time.perf_counter()

    async def one(i: int) -> None:
        nonlocal tokens, events, streams, last_done
        conn = HttpConn(host, port)
        try:
            while time.monotonic() < end:
                body = json.dumps({"model": "tiny", "prompt": [rng.randrange(3, 256) for _ in range(prompt_len)],
                                   "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                                   "stream_options": {"include_usage": True}}).encode()
                try:
                    status, headers = await conn.post("/v1/completions", body)
                    if status != 200:
                        errors.append(f"{status}: {(await conn.body(headers))[:200].decode(errors='replace')}")
                        continue
                    buf = b""
                    usage = None
                    async for data in conn.chunks():
                        buf += data
                        while b"\n\n" in buf:
                            ev, buf = buf.split(b"\n\n", 1)
                            events += 1
                            if ev.startswith(b"data: {") and b'"usage":{' in ev:
                                usage = json.loads(ev[6:])["usage"]
                    if usage is None:
                        errors.append("stream ended without usage")
                    else:
                        tokens += usage["completion_tokens"]
                        streams += 1
                        last_done = time.perf_counter()
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    await asyncio.sleep(0.01)
        finally:
            conn.close()

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(conns)))
    return {"tokens": tokens, "events": events, "streams": streams, "errors": errors,
            "cpu_s": time.process_time() - cpu0, "elapsed_s": last_done - t0}


async def _sdk_client(endpoint: str, conns: int, duration: float, prompt_len: int, max_tokens: int,
                      seed: int) -> dict:
    from sdk import AsyncClient, SdkError

    rng = random.Random(seed)
    tokens = 0
    chunks = 0
    streams = 0
    errors: list[str] = []
    end = time.monotonic() + duration
    last_done = time.perf_counter()
    client = AsyncClient(endpoint, timeout=120.0)

    async def one(i: int) -> None:
        nonlocal tokens, chunks, streams, last_done
        while time.monotonic() < end:
            try:
                async for c in client.stream(prompt_token_ids=[rng.randrange(3, 256) for _ in range(prompt_len)],
                                             max_tokens=max_tokens, ignore_eos=True):
                    tokens += len(c.token_ids)
                    chunks += 1
                streams += 1
                last_done = time.perf_counter()
            except SdkError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.01)

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(conns)))
    finally:
        await client.close()
    return {"tokens": tokens, "events": chunks, "streams": streams, "errors": errors,
            "cpu_s": time.process_time() - cpu0, "elapsed_s": last_done - t0}


def _client_main(kind: str, kwargs: dict) -> dict:
    fn = {"short": _short_client, "stream": _stream_client, "sdk": _sdk_client}[kind]
    try:
        import uvloop  # type: ignore[import-not-found]
        return uvloop.run(fn(**kwargs))
    except ImportError:
        return asyncio.run(fn(**kwargs))


def _run_clients(kind: str, procs: int, conns: int, **kw: Any) -> list[dict]:
    """Spread `conns` connections over `procs` client processes (1: this process)."""
    split = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    jobs = [dict(kw, conns=n, seed=i) for i, n in enumerate(split) if n > 0]
    if len(jobs) == 1:
        return [_client_main(kind, jobs[0])]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        return pool.starmap(_client_main, [(kind, j) for j in jobs])


# ---- phases ----------------------------------------------------------------------------------

def phase_short(opts: Options, host: str, port: int, meter: CpuMeter) -> dict:
    _run_clients("short", 1, min(4, opts.concurrency), host=host, port=port, duration=0.5,
                 prompt_len=opts.prompt_len)  # warm-up: connections, code paths
    meter.start()
    t0 = time.perf_counter()
    res = _run_clients("short", opts.client_procs, opts.concurrency, host=host, port=port, duration=opts.duration,
                       prompt_len=opts.prompt_len)
    elapsed = time.perf_counter() - t0
    lat = sorted(x * 1000 for r in res for x in r["latencies"])
    errors = [e for r in res for e in r["errors"]]
    cpu = meter.stop(sum(r["cpu_s"] for r in res))
    return {"requests": len(lat), "requests_per_s": round(len(lat) / elapsed, 1), "errors": len(errors),
            "error_samples": errors[:5], "latency_ms": {"p50": round(percentile(lat, 0.5), 3),
                                                        "p99": round(percentile(lat, 0.99), 3)},
            "concurrency": opts.concurrency, "elapsed_s": round(elapsed, 2), "cpu": cpu}


def phase_stream(opts: Options, kind: str, meter: CpuMeter, **target: Any) -> dict:
    meter.start()
    res = _run_clients(kind, opts.client_procs, opts.streams, duration=opts.duration, prompt_len=opts.prompt_len,
                       max_tokens=opts.stream_tokens, **target)
    elapsed = max(r["elapsed_s"] for r in res)
    tokens = sum(r["tokens"] for r in res)
    errors = [e for r in res for e in r["errors"]]
    cpu = meter.stop(sum(r["cpu_s"] for r in res))
    return {"tokens": tokens, "tokens_per_s": round(tokens / max(elapsed, 1e-9), 1),
            "streams": sum(r["streams"] for r in res), "events": sum(r["events"] for r in res),
            "errors": len(errors), "error_samples": errors[:5], "concurrency": opts.streams,
            "elapsed_s": round(elapsed, 2), "cpu": cpu}


def phase_dispatch(opts: Options) -> dict:
    from bench.scheduler import measure_dispatch_latency

    port = _free_port()
    env = {**os.environ, "KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS": "60000"}
    with open(os.devnull, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--base-port", str(port)], env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if not line.startswith("READY"):
                raise RuntimeError(f"scheduler did not start: {line!r}")
            meter = CpuMeter({"scheduler": [proc.pid]})
            meter.start()
            cpu0 = time.process_time()
            res = measure_dispatch_latency(line.split()[-1], instances=opts.instances,
                                           requests=opts.dispatch_requests)
            res["cpu"] = meter.stop(time.process_time() - cpu0)
            return res
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# ---- cluster ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cluster(opts: Options):  # noqa: ANN201 - LocalCluster
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster, free_ports

    http, base = free_ports(opts.workers)
    seqs = max(opts.streams, opts.concurrency) + 64
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "worker": {"engine": "sim", "model": "instant", "num_blocks": 1 << 16, "max_num_seqs": seqs,
                   "max_num_batched_tokens": max(2048, seqs * opts.prompt_len), "max_waiting": 4096},
        "frontend": {"model": "tiny", "max_inflight": 4096},
    })
    env = {"KVFERRY_LOG_LEVEL": "warning"}
    return LocalCluster(ClusterSpec(cfg, num_workers=opts.workers, ready_timeout_s=60, extra_env=env))


# ---- output ----------------------------------------------------------------------------------

def _fmt_cpu(c: dict[str, float]) -> str:
    keys = ("frontend_cores", "workers_cores", "scheduler_cores", "client_cores", "machine_busy_cores")
    return " ".join(f"{k.replace('_cores', '')}={c[k]:.2f}" for k in keys if k in c)


def print_table(out: dict) -> None:
    rows: list[tuple[str, str, str, str]] = []
    s = out.get("short")
    if s:
        rows.append(("short requests/s", f"{s['requests_per_s']:,.0f}", f">= {TARGETS['requests_per_s']:,.0f}",
                     f"p50 {s['latency_ms']['p50']:.2f} ms, p99 {s['latency_ms']['p99']:.2f} ms, "
                     f"{s['errors']} errors, c={s['concurrency']}; cpu {_fmt_cpu(s['cpu'])}"))
    for key, label in (("http", "streamed tokens/s (HTTP SSE)"), ("sdk", "streamed tokens/s (SDK)")):
        st = out.get(f"stream_{key}")
        if st:
            rows.append((label, f"{st['tokens_per_s']:,.0f}", f">= {TARGETS['streamed_tokens_per_s']:,.0f}",
                         f"{st['streams']} streams, {st['events']} events, {st['errors']} errors, "
                         f"c={st['concurrency']}; cpu {_fmt_cpu(st['cpu'])}"))
    d = out.get("dispatch")
    if d:
        rows.append((f"dispatch p50/p99/p999 ms ({d['instances']} inst.)",
                     f"{d['p50_ms']:.3f}/{d['p99_ms']:.3f}/{d['p999_ms']:.3f}",
                     f"p99 < {TARGETS['dispatch_p99_ms']:g}", f"{d['requests']} dispatches, max {d['max_ms']:.2f} ms"))
    widths = [max(len(r[i]) for r in rows + [("metric", "value", "target", "notes")]) for i in range(3)]
    print(f"{'metric':<{widths[0]}}  {'value':>{widths[1]}}  {'target':<{widths[2]}}  notes")
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    met = out["targets_met"]
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))


def run(opts: Options) -> int:
    skip = {s.strip() for s in opts.skip.split(",") if s.strip()}
    out: dict[str, Any] = {"machine": machine_info(), "config": {
        "duration_s": opts.duration, "concurrency": opts.concurrency, "streams": opts.streams,
        "stream_tokens": opts.stream_tokens, "prompt_len": opts.prompt_len, "workers": opts.workers,
        "client_procs": opts.client_procs, "instances": opts.instances, "sim_profile": "instant"}}
    t_start = time.monotonic()
    if not {"short", "stream", "sdk"} <= skip:
        cluster = make_cluster(opts)
        cluster.start()
        try:
            pids = {c.name: c.proc.pid for c in cluster.children}
            meter = CpuMeter({"frontend": [pids["frontend"]], "scheduler": [pids["scheduler"]],
                              "workers": [p for n, p in pids.items() if n.startswith("worker")]})
            out["pids"] = pids
            host, port = "127.0.0.1", cluster.spec.config.cluster.http_port
            if "short" not in skip:
                out["short"] = phase_short(opts, host, port, meter)
            if "stream" not in skip:
                out["stream_http"] = phase_stream(opts, "stream", meter, host=host, port=port)
            if "sdk" not in skip:
                out["stream_sdk"] = phase_stream(opts, "sdk", meter, endpoint=cluster.sdk_endpoint)
        finally:
            cluster.stop()
    if "dispatch" not in skip:
        d = phase_dispatch(opts)
        out["dispatch"] = d
    out["requests_per_s"] = out["short"]["requests_per_s"] if "short" in out else None
    out["errors"] = sum(out[k]["errors"] for k in ("short", "stream_http", "stream_sdk") if k in out)
    out["streamed_tokens_per_s"] = {"http": out["stream_http"]["tokens_per_s"] if "stream_http" in out else None,
                                    "sdk": out["stream_sdk"]["tokens_per_s"] if "stream_sdk" in out else None}
    out["dispatch_ms"] = ({"p50": out["dispatch"]["p50_ms"], "p99": out["dispatch"]["p99_ms"],
                           "p999": out["dispatch"]["p999_ms"]} if "dispatch" in out else None)
    out["targets"] = TARGETS
    met: dict[str, bool] = {}
    if out["requests_per_s"] is not None:
        met["requests_per_s"] = out["requests_per_s"] >= TARGETS["requests_per_s"]
    toks = [v for v in out["streamed_tokens_per_s"].values() if v is not None]
    if toks:
        met["streamed_tokens_per_s"] = max(toks) >= TARGETS["streamed_tokens_per_s"]
    if out["dispatch_ms"]:
        met["dispatch_p99_ms"] = out["dispatch_ms"]["p99"] < TARGETS["dispatch_p99_ms"]
    out["targets_met"] = met
    out["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    print_table(out)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(out, f, indent=2)
            f.write("\n")
    return 1 if out["errors"] else 0
