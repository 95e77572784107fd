"""Every engine a worker runs implements the engine contract (engine.interface.Engine), and the
queries that replaced services' reads of engine internals answer what those internals hold."""

from __future__ import annotations

import inspect

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.interface import Engine
from engine.request import SamplingParams
from engine.sim.latency import INSTANT

CONTRACT = [n for n, _ in inspect.getmembers(Engine, inspect.isfunction) if not n.startswith("_")]
PROPERTIES = [n for n, v in vars(Engine).items() if isinstance(v, property)]


def tiny() -> LLMEngine:
    return LLMEngine.from_model("tiny", EngineConfig(num_blocks=64, block_size=16, dtype="float32"))


def test_torch_and_sim_engines_implement_the_contract():
    sim = LLMEngine.sim(INSTANT, EngineConfig(num_blocks=64, block_size=16))
    for e in (tiny(), sim):
        assert isinstance(e, Engine)
        missing = [n for n in CONTRACT if not callable(getattr(e, n, None))]
        missing += [n for n in PROPERTIES if not isinstance(getattr(type(e), n, None), property)]
        assert missing == [] and {"kv_tensor", "kv_layout"} <= set(PROPERTIES)


def test_queries_follow_the_waiting_queue_reservations_and_detached_requests():
    e = tiny()
    assert e.num_waiting() == 0
    e.add_request("a", [1, 2, 3, 4], SamplingParams(max_tokens=8))
    e.add_request("b", [5, 6, 7], SamplingParams(max_tokens=8))
    assert e.num_waiting() == 2
    e.step()
    assert e.num_waiting() == 0
    assert not e.is_reserved("k")
    e.reserve("k", 2)
    assert e.is_reserved("k")
    e.release("k")
    assert not e.is_reserved("k")
    e.detach_request("a")
    assert e.is_detached("a") and not e.is_detached("b")
    e.reattach_request("a")
    assert not e.is_detached("a")
    while e.has_unfinished_requests():
        e.step()
    e.check_integrity()
