"""Prefill/decode disaggregation end to end: `kvferry up`'s processes with worker-0 in the prefill
role and worker-1 in the decode role (torch `tiny`, float32). Every request is dispatched to the
prefill worker, which hands it to the decode worker by live migration as soon as its first token
is out; the client's stream (SDK, openai) is the uninterrupted one, token for token, greedy and
seeded; a request that ends within its prefill stays; `kvferry ctl role` changes a role at run
time; every worker's blocks return to zero."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import openai
import pytest

from sdk import AsyncClient
from services.config import load_config
from services.launcher import ClusterSpec, LocalCluster, free_ports
from tests.test_e2e_cluster import ctl_status, wait_idle
from tests.test_e2e_failures import references, wait_status

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny"
LONG = 400


@pytest.fixture(scope="module")
def pd_cluster():
    http, base = free_ports(2)
    cfg = load_config(env={}, overrides={
        "cluster": {"http_port": http, "base_port": base},
        "scheduler": {"policy": "load", "pd_mode": "fixed"},  # no load-balancing moves: only hand-offs
        "worker": {"engine": "torch", "model": MODEL, "dtype": "float32", "num_blocks": 1024, "max_num_seqs": 16},
        "frontend": {"model": MODEL},
    })
    c = LocalCluster(ClusterSpec(cfg, num_workers=2, ready_timeout_s=120, prefill_workers=1, decode_workers=1))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def ctl(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", "ctl", *args, "--scheduler", c.scheduler_endpoint],
                          capture_output=True, text=True, timeout=60)


async def test_requests_are_prefilled_on_one_worker_and_decoded_on_the_other(pd_cluster):
    c = pd_cluster
    st = ctl_status(c)
    assert {i["worker_id"]: i["role"] for i in st["instances"]} == {"worker-0": "prefill", "worker-1": "decode"}
    prompts = [("Once upon a time", 0.0, None), ("The harbour at dawn", 0.9, 7), ("Dear diary", 0.0, None)]
    refs = asyncio.ensure_future(asyncio.to_thread(references, prompts, LONG))
    async with AsyncClient(c.sdk_endpoint, timeout=120) as sdk:
        async def run(prompt: str, temperature: float, seed: int | None) -> list[int]:
            toks: list[int] = []
            async with contextlib.aclosing(sdk.stream(prompt, max_tokens=LONG, temperature=temperature, seed=seed,
                                                      ignore_eos=True)) as chunks:
                async for ch in chunks:
                    toks.extend(ch.token_ids)
            return toks

        tasks = [asyncio.ensure_future(run(*p)) for p in prompts]
        try:
            # Each stream runs on the decode worker while it is still going: the hand-off happened.
            seen = await wait_status(c, lambda s: len([r for r in s.requests if r.worker_id == "worker-1"]) >= 3
                                     or all(t.done() for t in tasks), 60, "every stream on the decode worker")
            assert len([r for r in seen.requests if r.worker_id == "worker-1"]) >= 3, seen.requests
            got = [await asyncio.wait_for(t, 120) for t in tasks]
        finally:
            for t in tasks:
                t.cancel()
    assert got == await refs
    client = openai.AsyncOpenAI(base_url=f"{c.http_url}/v1", api_key="x", timeout=60, max_retries=0)
    try:
        one = await client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, extra_body={"ignore_eos": True})
        assert one.choices[0].finish_reason == "length"  # finished within its prefill: nothing to hand off
    finally:
        await client.close()
    wait_idle(c)


async def test_ctl_role_changes_a_role_at_run_time(pd_cluster):
    c = pd_cluster
    try:
        out = ctl(c, "role", "worker-1", "mixed")
        assert out.returncode == 0 and "decode -> mixed" in out.stdout, out.stderr
        await wait_status(c, lambda s: {i.worker_id: i.role for i in s.instances}.get("worker-1") == "mixed", 10,
                          "worker-1 mixed")
        bad = ctl(c, "role", "worker-9", "decode")
        assert bad.returncode == 1 and "worker-9" in bad.stderr
    finally:
        assert ctl(c, "role", "worker-1", "decode").returncode == 0
    assert "ROLE" in ctl(c, "status").stdout


async def test_streams_on_a_killed_decode_worker_go_on_at_the_prefill_worker(pd_cluster):
    """kill -9 of the decode worker while it decodes the streams: the frontend resumes each by
    recompute at the prefill worker (the only one left), which finds no decode target and decodes
    them itself; every stream is the undisturbed one; once worker-1 is back, hand-offs go on."""
    c = pd_cluster
    prompts = [("The river", 0.0, None), ("A lighthouse keeper", 0.0, None)]
    refs = asyncio.ensure_future(asyncio.to_thread(references, prompts, 2 * LONG))
    try:
        async with AsyncClient(c.sdk_endpoint, timeout=180) as sdk:
            async def run(prompt: str, temperature: float, seed: int | None) -> list[int]:
                toks: list[int] = []
                async with contextlib.aclosing(sdk.stream(prompt, max_tokens=2 * LONG, temperature=temperature,
                                                          seed=seed, ignore_eos=True)) as chunks:
                    async for ch in chunks:
                        toks.extend(ch.token_ids)
                return toks

            tasks = [asyncio.ensure_future(run(*p)) for p in prompts]
            try:
                await wait_status(c, lambda s: len([r for r in s.requests if r.worker_id == "worker-1"]) >= 2
                                  or any(t.done() for t in tasks), 60, "both streams on the decode worker")
                assert not any(t.done() for t in tasks), "a stream ended before the kill: raise max_tokens"
                c.kill("worker-1")
                got = [await asyncio.wait_for(t, 180) for t in tasks]
            finally:
                for t in tasks:
                    t.cancel()
        assert got == await refs
    finally:
        await asyncio.to_thread(c.respawn, "worker-1")
        await wait_status(c, lambda s: any(i.worker_id == "worker-1" and i.alive and i.role == "decode"
                                           for i in s.instances), 60, "worker-1 back")
    wait_idle(c)
