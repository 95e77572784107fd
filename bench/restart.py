"""`kvferry bench restart`: how fast a local cluster starts, and how fast a killed worker serves again.

Starts a cluster the way `kvferry up` does (scheduler, --workers workers of --engine/--model,
frontend; the supervisor on), timing the cold start to "every service ready and /health 200".
Then --rounds times: `kill -9` worker-0 and time, from the kill, (1) the supervisor's restart
(its exit seen, the restart delay waited, the new process spawned), (2) the new process's READY
(its engine built: the weights and the kernel loaded), (3) registered and alive in the
scheduler's status with a new pid (dispatchable again: "serving"), and (4) a completion served
through the frontend. Loopback only; stops by itself. JSON out with --json, a table printed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Options:
    """`kvferry bench restart`'s settings (the flags, same names; their defaults are the CLI's)."""

    engine: str
    model: str
    dtype: str
    workers: int
    rounds: int
    timeout: float
    json: str | None


def _cluster(opts: Options):  # noqa: ANN202 - LocalCluster, imported lazily
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster, free_ports

    http, base = free_ports(opts.workers)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "worker": {"engine": opts.engine, "model": opts.model, "dtype": opts.dtype},
        "frontend": {"model": opts.model if opts.engine != "sim" else "tiny"},
    })
    spec = ClusterSpec(cfg, num_workers=opts.workers, ready_timeout_s=opts.timeout,
                       extra_env={"KVFERRY_LOG_LEVEL": "WARNING"})
    return LocalCluster(spec)


async def _until(pred, timeout: float, what: str) -> float:  # noqa: ANN001
    """Poll `pred()` (sync or async) until true; the monotonic time it became true."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.02)


async def _round(cluster, model: str, timeout: float) -> dict[str, float]:  # noqa: ANN001
    import httpx

    from protocol import SchedulerReplies, StatusRequest
    from protocol.sockets import request_once

    async def worker0():  # noqa: ANN202
        st = await request_once(cluster.scheduler_endpoint, StatusRequest(include_requests=False),
                                SchedulerReplies, 2.0)
        return next((i for i in st.instances if i.worker_id == "worker-0"), None)

    old = cluster.current("worker-0")
    before = await worker0()
    t0 = time.monotonic()
    os.kill(old.proc.pid, signal.SIGKILL)
    t_spawn = await _until(lambda: cluster.current("worker-0") is not old, timeout, "restarted")
    new = cluster.current("worker-0")
    t_ready = await _until(lambda: bool(new.ready_line) or new.proc.poll() is not None, timeout, "READY")
    if not new.ready_line:
        raise RuntimeError(f"the restarted worker exited with status {new.proc.returncode}")

    async def registered() -> bool:
        try:
            i = await worker0()
        except Exception:  # noqa: BLE001 - ask again
            return False
        return i is not None and i.alive and i.pid == new.proc.pid and (before is None or i.registered_ms > before.registered_ms)

    t_reg = await _until(registered, timeout, "registered again")
    async with httpx.AsyncClient(timeout=timeout) as http:
        r = await http.post(f"{cluster.http_url}/v1/completions",
                            json={"model": model, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True})
        r.raise_for_status()
    t_served = time.monotonic()
    return {"restart_s": t_spawn - t0, "ready_s": t_ready - t0, "registered_s": t_reg - t0, "served_s": t_served - t0}


def run(opts: Options) -> int:
    cluster = _cluster(opts)
    t0 = time.monotonic()
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - LaunchError and the like: a clear line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cold = time.monotonic() - t0
    rounds: list[dict[str, float]] = []
    try:
        model = opts.model if opts.engine != "sim" else "tiny"
        for _ in range(opts.rounds):
            rounds.append(asyncio.run(_round(cluster, model, opts.timeout)))
    finally:
        cluster.stop()
    cols = ("restart_s", "ready_s", "registered_s", "served_s")
    result: dict[str, Any] = {
        "engine": opts.engine, "model": opts.model, "dtype": opts.dtype, "workers": opts.workers,
        "cold_start_s": cold, "rounds": rounds,
        "median": {c: statistics.median(r[c] for r in rounds) for c in cols},
        "cpu": _cpu_model(),
    }
    print(f"cold start ({opts.workers} x {opts.engine} {opts.model}): {cold:.1f} s to ready\n")
    print("kill -9 of worker-0, seconds after the kill until:")
    print(f"{'round':>5}  {'restarted':>9}  {'READY':>7}  {'registered':>10}  {'served':>7}")
    for k, r in enumerate(rounds, 1):
        print(f"{k:>5}  {r['restart_s']:>9.2f}  {r['ready_s']:>7.2f}  {r['registered_s']:>10.2f}  {r['served_s']:>7.2f}")
    m = result["median"]
    print(f"{'med':>5}  {m['restart_s']:>9.2f}  {m['ready_s']:>7.2f}  {m['registered_s']:>10.2f}  {m['served_s']:>7.2f}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""
