"""`kvferry bench overhead`: the same batch through the engine in process and through a live
1-worker cluster, in one run, paired, so the cost of serving stays measured.

For each batch size B and each of --pairs rounds, in process first, then served:
- in process: the worker's own engine build (`services.worker.engine_factory.build_engine`, the
  settings the served worker gets), B requests of --prompt-len token ids and --output-len tokens
  (ignore_eos) added at once and stepped to the end on one thread of its own, as the worker's
  engine thread does; a token's time is the end of the step that made it;
- served: a live cluster started once (scheduler, 1 worker, frontend: real processes on
  127.0.0.1) gets the same B prompts at once through the SDK; a token's time is its chunk's arrival.
Both sides use `vllm bench serve`'s definitions: TPOT per request = (last token - first token) /
(tokens - 1), TTFT = first token - send; "prefill tok/s" = B x prompt tokens / the last first
token's TTFT. Reported per B: medians over the pairs, served / in-process ratios, and the CPU the
serving path spent per streamed token (the worker's main thread: its event loop, token streaming
and scheduler link; the frontend process; the scheduler process), and the share of CPU time the
hypervisor stole from this VM during each side's run (`steal` in /proc/stat): on a shared VM a
pair with much steal on one side says more about the neighbours than about kvferry. JSON out, a
table printed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Options:
    """`kvferry bench overhead`'s settings (the flags, same names; their defaults are the CLI's)."""

    model: str
    dtype: str
    device: str
    batch_sizes: list[int]
    prompt_len: int
    output_len: int
    pairs: int
    threads: int | None
    timeout: float
    seed: int
    json: str | None


def prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def summarize(sent: float, times: list[list[float]], prompt_len: int) -> dict[str, float]:
    """TTFT/TPOT (ms) and prefill tok/s from each request's token times (seconds, one per token)."""
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t in times if len(t) > 1]
    ttfts = [t[0] - sent for t in times if t]
    return {"tpot_ms": 1000 * statistics.median(tpots), "ttft_ms": 1000 * statistics.median(ttfts),
            "prefill_tok_s": len(times) * prompt_len / max(ttfts)}


# ---- in process ------------------------------------------------------------------------------------

class InProcess:
    """The worker's engine, built and stepped on one thread of its own (one OpenMP team)."""

    def __init__(self, worker_cfg: Any) -> None:
        from services.worker.engine_factory import build_engine

        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.engine, self.info = self._thread.submit(build_engine, worker_cfg).result()

    def run(self, batch: list[list[int]], output_len: int, tag: str) -> dict[str, float]:
        return self._thread.submit(self._run, batch, output_len, tag).result()

    def _run(self, batch: list[list[int]], output_len: int, tag: str) -> dict[str, float]:
        from engine.request import SamplingParams

        times: dict[str, list[float]] = {}
        sent = time.perf_counter()
        for k, p in enumerate(batch):
            rid = f"{tag}-{k}"
            times[rid] = []
            self.engine.add_request(rid, p, SamplingParams(max_tokens=output_len, ignore_eos=True))
        while self.engine.has_unfinished_requests():
            outs = self.engine.step()
            now = time.perf_counter()
            for o in outs:
                if o.error:
                    raise RuntimeError(o.error)
                times[o.request_id].extend([now] * len(o.new_token_ids))
        return summarize(sent, list(times.values()), len(batch[0]))

    def close(self) -> None:
        self._thread.shutdown(wait=True)


# ---- served ----------------------------------------------------------------------------------------

class Steal:
    """The share of all CPUs' time stolen by the hypervisor between start() and stop()."""

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (v[7] if len(v) > 7 else 0), sum(v[:8])

    def __enter__(self) -> "Steal":
        self._s0, self._t0 = self._read()
        self.share = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        s1, t1 = self._read()
        self.share = (s1 - self._s0) / max(1, t1 - self._t0)


def _cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process (or one of its threads), seconds."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def served(endpoint: str, batch: list[list[int]], output_len: int, timeout: float) -> dict[str, float]:
    from sdk import AsyncClient

    async with AsyncClient(endpoint, timeout=timeout) as client:
        async def one(p: list[int]) -> list[float]:
            t: list[float] = []
            chunks = client.stream(prompt_token_ids=p, max_tokens=output_len, ignore_eos=True, timeout=timeout)
            async with contextlib.aclosing(chunks):
                async for c in chunks:
                    if c.token_ids:
                        now = time.perf_counter()
                        t.extend([now] * len(c.token_ids))
            return t

        sent = time.perf_counter()
        times = await asyncio.wait_for(asyncio.gather(*(one(p) for p in batch)), timeout)
    return summarize(sent, list(times), len(batch[0]))


def start_cluster(opts: Options, threads: int):  # noqa: ANN201 - LocalCluster, imported lazily
    from services.config import load_config
    from services.launcher import ClusterSpec, LocalCluster, free_port_block, free_ports

    http, base = free_ports(1)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"metrics_port": free_port_block(1)},
        "worker": {"engine": "torch", "model": opts.model, "dtype": opts.dtype, "device": opts.device,
                   "threads": threads, "max_num_seqs": max(64, max(opts.batch_sizes))},
        "frontend": {"model": opts.model, "max_inflight": 4096},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=1, ready_timeout_s=opts.timeout,
                                 extra_env={"KVFERRY_LOG_LEVEL": "WARNING"}))
    c.start()
    return c, cfg


# ---- the run ---------------------------------------------------------------------------------------

def run(opts: Options) -> int:
    threads = opts.threads or (os.cpu_count() or 1)
    cluster, cfg = start_cluster(opts, threads)
    rows: list[dict[str, Any]] = []
    try:
        import torch

        torch.set_num_threads(threads)
        local = InProcess(cfg.worker)
        vocab = local.engine.model_config.vocab_size if local.engine.model_config else 32000
        worker = cluster.current("worker-0")
        frontend, scheduler = cluster.current("frontend"), cluster.current("scheduler")
        assert worker is not None and frontend is not None and scheduler is not None
        wpid, fpid, spid = worker.proc.pid, frontend.proc.pid, scheduler.proc.pid
        rng = random.Random(opts.seed)
        try:
            # warm both sides once (first-call allocations, the kernel's first run)
            warm = prompts(rng, 2, opts.prompt_len, vocab)
            local.run(warm, 4, "warm")
            asyncio.run(served(cluster.sdk_endpoint, warm, 4, opts.timeout))
            for b in opts.batch_sizes:
                for pair in range(opts.pairs):
                    batch = prompts(rng, b, opts.prompt_len, vocab)
                    with Steal() as steal_ours:
                        ours = local.run(batch, opts.output_len, f"b{b}-{pair}")
                    cpu0 = (_cpu_s(wpid, wpid), _cpu_s(fpid), _cpu_s(spid))
                    with Steal() as steal_srv:
                        srv = asyncio.run(served(cluster.sdk_endpoint, batch, opts.output_len, opts.timeout))
                    cpu1 = (_cpu_s(wpid, wpid), _cpu_s(fpid), _cpu_s(spid))
                    ours["steal"], srv["steal"] = steal_ours.share, steal_srv.share
                    tokens = b * opts.output_len
                    rows.append({"batch": b, "pair": pair, "in_process": ours, "served": srv,
                                 "tpot_ratio": srv["tpot_ms"] / ours["tpot_ms"],
                                 "prefill_ratio": ours["prefill_tok_s"] / srv["prefill_tok_s"],
                                 "worker_loop_us_per_token": 1e6 * (cpu1[0] - cpu0[0]) / tokens,
                                 "frontend_us_per_token": 1e6 * (cpu1[1] - cpu0[1]) / tokens,
                                 "scheduler_us_per_token": 1e6 * (cpu1[2] - cpu0[2]) / tokens})
                    print(f"batch {b:3d} pair {pair + 1}: TPOT in process {ours['tpot_ms']:.1f} ms, "
                          f"served {srv['tpot_ms']:.1f} ms ({rows[-1]['tpot_ratio']:.2f}x); steal "
                          f"{100 * ours['steal']:.0f} % / {100 * srv['steal']:.0f} %", file=sys.stderr)
        finally:
            local.close()
    finally:
        cluster.stop()
    result = {"model": opts.model, "dtype": opts.dtype, "threads": threads, "cpus": os.cpu_count(),
              "prompt_len": opts.prompt_len, "output_len": opts.output_len, "pairs": opts.pairs,
              "summary": summary(rows), "rows": rows}
    print(table(result))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for b in sorted({r["batch"] for r in rows}):
        rs = [r for r in rows if r["batch"] == b]

        def med(f) -> float:  # noqa: ANN001
            return statistics.median(f(r) for r in rs)

        out.append({"batch": b,
                    "tpot_in_process_ms": med(lambda r: r["in_process"]["tpot_ms"]),
                    "tpot_served_ms": med(lambda r: r["served"]["tpot_ms"]),
                    "tpot_ratio": med(lambda r: r["tpot_ratio"]),
                    "tpot_ratio_max": max(r["tpot_ratio"] for r in rs),
                    "prefill_in_process_tok_s": med(lambda r: r["in_process"]["prefill_tok_s"]),
                    "prefill_served_tok_s": med(lambda r: r["served"]["prefill_tok_s"]),
                    "prefill_ratio": med(lambda r: r["prefill_ratio"]),
                    "worker_loop_us_per_token": med(lambda r: r["worker_loop_us_per_token"]),
                    "frontend_us_per_token": med(lambda r: r["frontend_us_per_token"]),
                    "scheduler_us_per_token": med(lambda r: r["scheduler_us_per_token"]),
                    # the worker's event loop (token streaming, scheduler link) per decode step, as a
                    # share of the step: what streaming costs the engine's process
                    "loop_share_of_step": med(lambda r: r["worker_loop_us_per_token"] * b
                                              / (1000 * r["served"]["tpot_ms"])),
                    "steal_max": max(max(r["in_process"]["steal"], r["served"]["steal"]) for r in rs)})
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"kvferry bench overhead: {res['model']} {res['dtype']}, {res['threads']} torch threads on "
             f"{res['cpus']} CPUs, {res['prompt_len']} prompt + {res['output_len']} output tokens, "
             f"{res['pairs']} pairs (medians)",
             f"{'batch':>5} {'TPOT proc':>10} {'TPOT served':>12} {'ratio':>6} {'max':>6} "
             f"{'prefill proc':>13} {'prefill srv':>12} {'ratio':>6} {'loop us/tok':>12} {'fe us/tok':>10} {'loop/step':>9} {'steal':>6}"]
    for s in res["summary"]:
        lines.append(f"{s['batch']:>5} {s['tpot_in_process_ms']:>8.1f}ms {s['tpot_served_ms']:>10.1f}ms "
                     f"{s['tpot_ratio']:>6.2f} {s['tpot_ratio_max']:>6.2f} {s['prefill_in_process_tok_s']:>9.0f}t/s "
                     f"{s['prefill_served_tok_s']:>8.0f}t/s {s['prefill_ratio']:>6.2f} "
                     f"{s['worker_loop_us_per_token']:>12.1f} {s['frontend_us_per_token']:>10.1f} "
                     f"{100 * s['loop_share_of_step']:>8.1f}% {100 * s['steal_max']:>5.0f}%")
    lines.append("(ratio: served / in process for TPOT, in process / served for prefill throughput; "
                 "loop: the worker's event-loop thread, fe: the frontend process, CPU per streamed token; "
                 "loop/step: that loop's CPU per decode step as a share of the step; steal: the most CPU time the hypervisor took from this VM in any one run)")
    return "\n".join(lines)
