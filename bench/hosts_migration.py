"""A live migration's downtime between two hosts next to the same migration within one host, for
`kvferry bench transfer --between-hosts`.

Hosts are Linux network namespaces joined by veth pairs through a bridge, each service in its own
UTS namespace with the host's name, started from the systemd units' command lines (testkit.hosts).
Three clusters, one after the other, each a scheduler, a frontend and worker 0 on host a:

- `one host`: worker 1 on host a too, the frames path forced (`[worker] migration_path`), so the
  KV crosses the host's own TCP stack: the loopback baseline, like for like with the next row;
- `two hosts`: worker 1 on host b: frames over the veth and the bridge (chosen by itself);
- `two hosts + Curve`: the same with CurveZMQ on every socket, as a cluster across hosts runs.

In each, one greedy stream (a seeded `--context`-token prompt, ignore_eos) is moved back and forth
`--migrations` times by the scheduler's migrate command (what `kvferry ctl migrate` sends), each
move once the previous one is listed at its destination. Per move: the downtime as the source
measures it (request detached to commit acknowledged; the scheduler's
`kvferry_scheduler_migration_downtime_seconds` sum and count, read before and after) and the KV
bytes sent (the workers' `kvferry_migration_bytes_total{path="frames"}`). Prefix caching is off, so
every move sends the whole context, most of it in pre-copy while the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CLUSTERS = {  # name -> (layout, worker settings beyond the common ones, Curve)
    "one host": ({"a": ["scheduler", "frontend", "worker", "worker"]}, {"migration_path": "frames"}, False),
    "two hosts": ({"a": ["scheduler", "frontend", "worker"], "b": ["worker"]}, {}, False),
    "two hosts + Curve": ({"a": ["scheduler", "frontend", "worker"], "b": ["worker"]}, {}, True),
}
CLUSTER_FLAGS = {"one-host": "one host", "two-hosts": "two hosts", "two-hosts-curve": "two hosts + Curve"}
DOWNTIME = "kvferry_scheduler_migration_downtime_seconds"
FRAMES_BYTES = 'kvferry_migration_bytes_total{path="frames"}'
MOVE_S = 120.0  # one move, from the command to the scheduler's record of its result
START_S = 300.0  # a cluster's start (model load on a loaded 2-core machine)
MAX_TOKENS = 4000  # the stream outlives its moves; it is closed once they are done


async def _located(mh: Any, deadline_s: float, where: str | None = None) -> tuple[str, str]:
    """(request id, worker id) of the one request the scheduler lists (on `where`, if given)."""
    from protocol import StatusRequest
    from testkit.wait import until

    async def found() -> tuple[str, str] | None:
        st = await mh.ask(StatusRequest())
        hits = [(r.request_id, r.worker_id) for r in st.requests if where is None or r.worker_id == where]
        return hits[0] if hits else None

    return await until(found, deadline_s, f"the stream listed{' on ' + where if where else ''}", step_s=0.05)


def _totals(mh: Any, workers: list[str]) -> tuple[float, float, float]:
    """(downtime sum s, downtime count, frames bytes sent by `workers`) from the /metrics pages."""
    from testkit.hosts import scrape

    sched = scrape(mh.metrics_url("scheduler"))
    sent = sum(scrape(mh.metrics_url(w)).get(FRAMES_BYTES, 0.0) for w in workers)
    return sched.get(f"{DOWNTIME}_sum", 0.0), sched.get(f"{DOWNTIME}_count", 0.0), sent


async def _measure(mh: Any, migrations: int, context: int, seed: int) -> list[dict[str, float]]:
    import httpx

    from protocol import MigrateRequestTo
    from testkit.wait import until

    workers = mh.worker_ids()
    prompt = [random.Random(seed).randrange(1, 200) for _ in range(context)]
    body = {"model": mh.sections["frontend"]["model"], "prompt": prompt, "max_tokens": MAX_TOKENS,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    moves: list[dict[str, float]] = []
    async with httpx.AsyncClient(timeout=MOVE_S) as http:
        async with http.stream("POST", f"{mh.http_url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            lines = resp.aiter_lines()
            await lines.__anext__()  # the first token is out: the prompt's KV is computed
            reader = asyncio.ensure_future(_drain(lines))
            try:
                rid, at = await _located(mh, MOVE_S)
                for _ in range(migrations):
                    dst = next(w for w in workers if w != at)
                    before = await asyncio.to_thread(_totals, mh, workers)
                    t0 = time.perf_counter()
                    await mh.ask(MigrateRequestTo(request_id=rid, dst_worker_id=dst))
                    await _located(mh, MOVE_S, where=dst)
                    after = await until(lambda b=before: _counted(mh, workers, b), MOVE_S, "the migration's result",
                                        step_s=0.05)
                    moves.append({"downtime_ms": (after[0] - before[0]) * 1000.0, "bytes": after[2] - before[2],
                                  "move_s": time.perf_counter() - t0})
                    at = dst
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await reader
    return moves


async def _counted(mh: Any, workers: list[str], before: tuple[float, float, float]) -> tuple[float, float, float] | None:
    now = await asyncio.to_thread(_totals, mh, workers)
    return now if now[1] > before[1] else None


async def _drain(lines: Any) -> None:  # keeps the stream read while it is moved
    async for _ in lines:
        pass


def run_clusters(model: str, migrations: int, context: int = 1024, seed: int = 0, log_dir: Path | None = None,
                 names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per cluster of CLUSTERS (`names`: those only): median and max downtime, bytes per move."""
    from testkit.hosts import MultiHost

    rows = []
    for name in names or list(CLUSTERS):
        layout, extra, curve = CLUSTERS[name]
        with tempfile.TemporaryDirectory(prefix="kvferry-bh-") as tmp:
            logs = (log_dir / name.replace(" ", "-").replace("+", "")) if log_dir else Path(tmp)
            # No prefix caching: a move back would find the prompt's blocks still cached at its
            # destination and send only the rest; every move here sends the whole context.
            worker = {"engine": "torch", "model": model, "dtype": "bfloat16", "threads": 1, "max_num_seqs": 8,
                      "prefix_caching": False, **extra}
            # A CPU-only host, as deploy/systemd/kvferry.env says (the worker unit sets the device to cuda).
            with MultiHost(layout, logs, worker=worker, scheduler={"policy": "load"}, frontend={"model": model},
                           env={"KVFERRY_WORKER_DEVICE": "cpu"}, curve=curve, ready_s=START_S) as mh:
                moves = asyncio.run(_measure(mh, migrations, context, seed))
        downtimes = [m["downtime_ms"] for m in moves]
        rows.append({"cluster": name, "model": model, "context": context, "migrations": len(moves),
                     "downtime_ms_median": statistics.median(downtimes), "downtime_ms_max": max(downtimes),
                     "bytes_per_move": statistics.median(m["bytes"] for m in moves),
                     "move_s_median": statistics.median(m["move_s"] for m in moves), "moves": moves})
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'migration':<20}{'moves':>6}{'MB/move':>9}{'downtime ms (median)':>22}{'(max)':>8}")
    for r in rows:
        print(f"{r['cluster']:<20}{r['migrations']:>6}{r['bytes_per_move'] / 1e6:>9.1f}"
              f"{r['downtime_ms_median']:>22.1f}{r['downtime_ms_max']:>8.1f}")


if __name__ == "__main__":  # a quick look: python -m bench.hosts_migration
    print(json.dumps(run_clusters("tiny", 2), indent=2))
