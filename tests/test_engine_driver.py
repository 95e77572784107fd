"""The worker's engine driver: steps on its own thread, commands run between steps."""

import asyncio

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidRequestError
from engine.sim.latency import LLAMA7B_A10
from services.worker.engine_driver import EngineDriver


@pytest.fixture
def sim_engine():
    return LLMEngine.sim(LLAMA7B_A10, EngineConfig(num_blocks=256, debug_checks=True), clock="virtual")


async def test_requests_stream_and_finish(sim_engine):
    loop = asyncio.get_running_loop()
    got: dict[str, list[int]] = {}
    done = asyncio.Event()

    def on_outputs(outs):
        for o in outs:
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
        if len(got) == 3 and all(len(v) == 5 for v in got.values()):
            done.set()

    driver = EngineDriver(sim_engine, loop, on_outputs)
    driver.start()
    try:
        for i in range(3):
            await driver.call(lambda e, i=i: e.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
        await asyncio.wait_for(done.wait(), 10)
        stats = await driver.call(lambda e: e.stats())
        assert stats.num_free_blocks == stats.num_blocks
    finally:
        driver.stop()


async def test_command_errors_reach_the_caller_and_the_driver_keeps_going(sim_engine):
    driver = EngineDriver(sim_engine, asyncio.get_running_loop(), lambda outs: None)
    driver.start()
    try:
        with pytest.raises(InvalidRequestError, match="empty"):
            await driver.call(lambda e: e.add_request("bad", []))
        req = await driver.call(lambda e: e.add_request("ok", [5], SamplingParams(max_tokens=2, ignore_eos=True)))
        assert req.request_id == "ok"
    finally:
        driver.stop()
