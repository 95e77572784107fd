"""Dispatch latency of a running scheduler with N registered instances (for `kvferry bench`).

`measure_dispatch_latency(endpoint, instances=64, requests=5000)` registers N fake workers (they
keep sending load reports at `report_interval_s` from a separate process while it measures),
then sends DispatchRequests one at a time from a frontend DEALER and returns round-trip
percentiles in milliseconds. `python -m bench.scheduler` starts its own scheduler
process and prints the figures as JSON.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import multiprocessing
import time
from typing import Any

import zmq

from protocol import (
    DispatchReply,
    DispatchRequest,
    LoadReport,
    RegisterReply,
    RegisterWorker,
    SchedulerReplies,
    WorkerEndpoints,
)
from protocol.codec import decode, encode
from protocol.to_worker import WorkerSchedulerReplies


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def measure_dispatch_latency(endpoint: str, instances: int = 64, requests: int = 5000,
                             report_interval_s: float = 0.05, warmup: int = 200, seed: int = 0) -> dict[str, Any]:
    """Round-trip dispatch latency (ms) through a live scheduler at `endpoint` with `instances` workers."""
    rng = random.Random(seed)
    ctx = zmq.Context()
    stop_mp = multiprocessing.get_context("spawn").Event()
    reporter = None
    workers: list[zmq.Socket] = []
    try:
        for i in range(instances):
            w = ctx.socket(zmq.DEALER)
            w.setsockopt(zmq.LINGER, 0)
            w.setsockopt(zmq.IDENTITY, f"bench-w{i}".encode())
            w.connect(endpoint)
            w.send(encode(RegisterWorker(
                worker_id=f"bench-w{i}", endpoints=WorkerEndpoints(control=f"tcp://127.0.0.1:{40 + i % 50}",
                                                                   migration="tcp://127.0.0.1:9"),
                host="bench", engine="sim", model="bench", total_blocks=1000, block_size=16)))
            workers.append(w)
        for w in workers:
            if not w.poll(5000) or not isinstance(decode(w.recv(), WorkerSchedulerReplies), RegisterReply):
                raise RuntimeError("registration failed")

        # Load reports come from another process: in a thread they would hold the GIL in bursts
        # (64 encodes + sends every interval) and show up as this loop's latency, not the scheduler's.
        mp = multiprocessing.get_context("spawn")
        started = mp.Event()
        reporter = mp.Process(target=_report_loop, args=(endpoint, instances, report_interval_s, stop_mp, started, seed),
                              daemon=True)
        reporter.start()
        if not started.wait(30):
            raise RuntimeError("the load reporter process did not start")
        fe = ctx.socket(zmq.DEALER)
        fe.setsockopt(zmq.LINGER, 0)
        fe.connect(endpoint)
        times: list[float] = []
        for n in range(warmup + requests):
            msg = DispatchRequest(request_id=f"bench-{n}", num_prompt_tokens=rng.randint(1, 2048), frontend_id="bench")
            t0 = time.perf_counter()
            fe.send(encode(msg))
            if not fe.poll(5000):
                raise RuntimeError("no dispatch reply within 5 s")
            reply = decode(fe.recv(), SchedulerReplies)
            dt = time.perf_counter() - t0
            if not isinstance(reply, DispatchReply):
                raise RuntimeError(f"dispatch failed: {reply}")
            if n >= warmup:
                times.append(dt * 1000)
        stop_mp.set()
        reporter.join(5)
        times.sort()
        return {"instances": instances, "requests": requests, "p50_ms": round(_percentile(times, 0.50), 4),
                "p99_ms": round(_percentile(times, 0.99), 4),
                "p999_ms": round(_percentile(times, 0.999), 4), "max_ms": round(times[-1], 4),
                "mean_ms": round(sum(times) / len(times), 4)}
    finally:
        stop_mp.set()
        if reporter is not None and reporter.is_alive():
            reporter.kill()
        ctx.destroy(linger=0)


def _report_loop(endpoint: str, instances: int, interval_s: float, stop, started, seed: int) -> None:  # noqa: ANN001
    """Child process: every interval, one LoadReport per fake worker (its own sockets)."""
    rng = random.Random(seed + 1)
    ctx = zmq.Context()
    socks = []
    for i in range(instances):
        w = ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.LINGER, 0)
        w.connect(endpoint)
        socks.append(w)
    started.set()
    seq = 1000  # above the registration's reports
    try:
        while not stop.is_set():
            seq += 1
            for i, w in enumerate(socks):
                w.send(encode(LoadReport(worker_id=f"bench-w{i}", seq=seq, total_blocks=1000,
                                         free_blocks=rng.randint(0, 1000), num_running=rng.randint(0, 32),
                                         num_waiting=rng.randint(0, 2))))
            stop.wait(interval_s)
    finally:
        ctx.destroy(linger=0)


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "KVFERRY_SCHEDULER_HEARTBEAT_TIMEOUT_MS": "60000"}
    log = open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-m", "services.scheduler", "--base-port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline().strip()
        if not line.startswith("READY"):
            raise RuntimeError(f"scheduler did not start: {line!r}")
        instances = int(sys.argv[1]) if len(sys.argv) > 1 else 64
        print(json.dumps(measure_dispatch_latency(line.split()[-1], instances=instances)))
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
