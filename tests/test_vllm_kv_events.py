"""engine/vllm_backend/kv_events.py: vLLM's KV cache events re-hashed into kvferry's block hashes
(no vLLM needed: the events are stand-ins with vLLM's field names; tests/test_vllm_engine.py has
the real ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.vllm_backend.kv_events import VllmKvEvents
from protocol.kv_hash import prompt_hashes, root_from_namespace

NS, BS = 12345, 4


@dataclass
class BlockStored:
    block_hashes: list[Any]
    parent_block_hash: Any
    token_ids: list[int]
    block_size: int = BS
    lora_id: int | None = None
    lora_name: str | None = None
    extra_keys: list[tuple[Any, ...] | None] | None = None


@dataclass
class BlockRemoved:
    block_hashes: list[Any]


@dataclass
class AllBlocksCleared:
    pass


@dataclass
class Batch:
    events: list[Any] = field(default_factory=list)


def ours(tokens: list[int], salt: str = "") -> list[int]:
    """What a frontend computes for a prompt (services/frontend/prompt_hashes.py)."""
    return prompt_hashes(tokens, BS, root_from_namespace(NS, salt))


def fresh() -> VllmKvEvents:
    ev = VllmKvEvents(NS, BS, max_pending=64)
    ev.enable()
    assert ev.take() == type(ev.take())(reset=True)  # the first take: a reset (an empty cache)
    return ev


def test_stored_blocks_get_the_frontend_s_hashes_across_events_and_salts():
    ev = fresh()
    prompt = list(range(1, 13))  # 3 blocks, stored in two steps as vLLM does (prefill, then decode)
    ev.publish(Batch([BlockStored(["v0", "v1"], None, prompt[:8])]))
    ev.publish(Batch([BlockStored(["v2"], "v1", prompt[8:])]))
    got = ev.take()
    assert got.stored == ours(prompt) and not got.removed and not got.reset
    # The salt is among the first block's extra keys: another tenant's blocks hash apart.
    ev.publish(Batch([BlockStored(["s0", "s1"], None, prompt[:8], extra_keys=[("tenant",), None])]))
    assert ev.take().stored == ours(prompt[:8], "tenant") != ours(prompt[:8])


def test_evictions_are_removed_once_the_last_copy_goes_and_resync_sends_everything():
    ev = fresh()
    prompt = list(range(20, 28))
    h = ours(prompt)
    ev.publish(Batch([BlockStored(["a", "b"], None, prompt), BlockStored(["b"], "a", prompt[4:])]))  # a duplicate
    assert ev.take().stored == h
    ev.publish(Batch([BlockRemoved(["b"])]))
    assert not ev.take()  # a copy of b is still cached
    ev.publish(Batch([BlockRemoved(["b", "never-seen"])]))
    assert ev.take().removed == [h[1]]
    assert ev.take(resync=True).stored == [h[0]] and ev.cached_hashes() == [h[0]]
    ev.publish(Batch([BlockStored(["c"], "a", [9, 9, 9, 9]), BlockRemoved(["c"])]))
    assert not ev.take().stored  # stored and evicted between two takes: net, only the removal
    ev.publish(Batch([AllBlocksCleared()]))
    assert ev.take() == type(ev.take())(reset=True) and not ev.cached_hashes()


def test_blocks_it_cannot_rehash_are_left_out_and_counted():
    ev = fresh()
    toks = list(range(8))
    ev.publish(Batch([
        BlockStored(["x"], "unknown parent", toks[:4]),
        BlockStored(["l"], None, toks[:4], lora_name="adapter"),
        BlockStored(["m0", "m1"], None, toks, extra_keys=[("salt", ("mm", 0)), None]),
        BlockStored(["m2"], None, toks[:4], extra_keys=[None]),  # fine: no extra key
        BlockStored(["w"], None, toks[:4], block_size=8),
        BlockStored(["t"], None, toks[:3]),  # tokens do not fill the blocks
    ]))
    assert ev.take().stored == ours(toks[:4])
    assert ev.untranslated == 1 + 1 + 2 + 1 + 1


def test_a_flood_of_events_overflows_into_a_reset_and_memory_follows_the_cache():
    ev = fresh()
    for i in range(100):
        ev.publish(Batch([BlockStored([f"f{i}"], None, [i, i, i, i])]))
    for i in range(90):
        ev.publish(Batch([BlockRemoved([f"f{i}"])]))
    got = ev.take()  # 190 pending changes > 64: a reset with what is cached now
    assert got.reset and len(got.stored) == 10 and len(ev.cached_hashes()) == 10
    assert not ev.take()
    off = VllmKvEvents(NS, BS, max_pending=64)  # not enabled: records nothing, reports nothing
    off.publish(Batch([BlockStored(["z"], None, [1, 2, 3, 4])]))
    assert not off.take()
