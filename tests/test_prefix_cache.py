"""Prefix caching in kvferry's engine (design §4): the block manager's shared, reference-counted,
LRU-cached blocks; the scheduler's reuse of a prompt's cached prefix; and greedy output with
caching on equal to caching off, with chunked prefill and preemption forced (the oracle)."""

from __future__ import annotations

import random

import pytest

from protocol.kv_hash import block_hash, prompt_hashes, root_hash
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import MigrationError, OutOfBlocksError
from engine.request import SamplingParams
from engine.sim.latency import LLAMA7B_A10

BS = 4
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def tiny(**kw) -> LLMEngine:  # noqa: ANN003
    cfg = {"dtype": "float32", "block_size": BS, "num_blocks": 96, "debug_checks": True, **kw}
    return LLMEngine.from_model("tiny", EngineConfig(**cfg))


def run(engine: LLMEngine, prompts: list[list[int]], sampling: SamplingParams = GREEDY,
        one_by_one: bool = True) -> list[list[int]]:
    """Greedy outputs; one request after another (so later ones can hit), or all at once."""
    if not one_by_one:
        return [r.output_token_ids for r in engine.generate(prompts, sampling)]
    return [engine.generate([p], sampling)[0].output_token_ids for p in prompts]


# ---- hashes ------------------------------------------------------------------------------------

def test_block_hashes_chain_and_are_stable_across_processes() -> None:
    root = root_hash("tiny@0", "float32")
    assert root == root_hash("tiny@0", "float32") != root_hash("tiny@0", "float32", "tenant-a")
    assert root != root_hash("tiny@1", "float32") != root_hash("tiny@0", "bfloat16")
    hs = prompt_hashes(list(range(10)), BS, root)
    assert len(hs) == 2 and hs[1] == block_hash(hs[0], [4, 5, 6, 7])
    assert prompt_hashes([9, 1, 2, 3, 4, 5, 6, 7], BS, root)[1] != hs[1]  # same tokens, other prefix
    # A known answer: BLAKE2b, not Python's per-process hash (frontends and workers must agree).
    assert block_hash(0, [1, 2, 3, 4]) == block_hash(0, (1, 2, 3, 4)) == 0x2728AB4454AAA05B


# ---- the block manager ---------------------------------------------------------------------------

def test_shared_blocks_are_counted_and_cached_after_their_last_owner() -> None:
    bm = BlockManager(8, BS)
    a = bm.allocate("a", 3)
    assert [bm.register(b, 100 + i) for i, b in enumerate(a[:2])] == [True, True]
    assert not bm.register(a[2], 100)  # that content is cached already: this block stays private
    hit = bm.cached_prefix([100, 101, 999])
    assert hit == a[:2] and bm.num_unowned(hit) == 0
    bm.share("b", hit)
    bm.allocate("b", 1)
    assert bm.num_free == 8 - 4 and bm.num_cached == 2
    bm.check_integrity({"a", "b"})
    bm.free("a")  # a's private block is free again; the shared two stay b's
    assert bm.num_free == 8 - 3
    bm.free("b")  # now unowned, still cached, and counted as free
    assert bm.num_free == 8 and bm.num_cached == 2 and bm.num_unowned(hit) == 2
    bm.check_integrity(set())
    bm.share("c", bm.cached_prefix([100]))
    assert bm.num_free == 7
    bm.check_integrity({"c"})


def test_allocation_takes_free_blocks_first_then_evicts_the_oldest_cached() -> None:
    bm = BlockManager(4, BS)
    x = bm.allocate("x", 2)
    bm.register(x[0], 1)
    bm.register(x[1], 2)
    bm.free("x")  # tail first in line: block x[1] (hash 2) is evicted before x[0]
    got = bm.allocate("y", 2)
    assert set(got).isdisjoint(x) and bm.num_cached == 2 and bm.evictions == 0
    bm.allocate("y", 1)
    assert bm.evictions == 1 and bm.cached_prefix([1, 2]) == [x[0]]
    with pytest.raises(OutOfBlocksError):
        bm.allocate("y", 2)
    bm.check_integrity({"y"})


def test_sharing_an_uncached_block_or_into_a_nonempty_table_is_refused() -> None:
    bm = BlockManager(4, BS)
    a = bm.allocate("a", 1)
    with pytest.raises(OutOfBlocksError):
        bm.share("b", a)  # not registered
    bm.register(a[0], 7)
    with pytest.raises(OutOfBlocksError):
        bm.share("a", a)
    with pytest.raises(OutOfBlocksError):
        bm.register(3, 8)  # a free block has no KV to cache


# ---- the engine ----------------------------------------------------------------------------------

def shared_prefix_prompts(n: int, prefix_len: int, tail_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1, 200) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(1, 200) for _ in range(tail_len)] for _ in range(n)]


def test_a_request_reuses_the_cached_prefix_and_prefills_only_the_rest() -> None:
    e = tiny()
    p = shared_prefix_prompts(2, prefix_len=4 * BS + 1, tail_len=3)
    run(e, p[:1])
    st = e.stats()
    assert st.prefix_query_tokens == len(p[0]) and st.prefix_hit_tokens == 0 and st.num_cached_blocks >= 4
    e.add_request("second", p[1], GREEDY)
    sched = e.scheduler.schedule()
    assert [(s.request.request_id, s.start, s.num_new_tokens) for s in sched.scheduled] == \
        [("second", 4 * BS, len(p[1]) - 4 * BS)]
    e.abort_request("second")
    assert e.stats().prefix_hit_tokens == 4 * BS
    e.check_integrity()


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    e = tiny()
    prompt = list(range(1, 3 * BS + 1))  # exactly three full blocks
    first = run(e, [prompt])
    e.add_request("again", prompt, GREEDY)
    (s,) = e.scheduler.schedule().scheduled
    assert (s.start, s.num_new_tokens) == (2 * BS, BS)  # the last block again, into a private block
    e.abort_request("again")
    assert run(e, [prompt]) == first


@pytest.mark.parametrize("one_by_one", [True, False])
def test_greedy_output_with_caching_equals_caching_off_under_chunked_prefill_and_preemption(one_by_one: bool) -> None:
    """The oracle: the same tokens with and without the cache, with prefills chunked at 7 tokens and
    so few blocks that requests are preempted (and their cached blocks evicted) along the way."""
    prompts = shared_prefix_prompts(6, prefix_len=5 * BS + 2, tail_len=5, seed=1)
    prompts += [prompts[0][:3 * BS]] + shared_prefix_prompts(2, prefix_len=2 * BS, tail_len=9, seed=2)
    small = {"num_blocks": 14, "max_num_batched_tokens": 7, "max_num_seqs": 4}
    off, on = tiny(prefix_caching=False, **small), tiny(**small)
    assert run(on, prompts, one_by_one=one_by_one) == run(off, prompts, one_by_one=one_by_one)
    assert on.stats().prefix_hit_tokens > 0 and off.stats().prefix_hit_tokens == 0
    if not one_by_one:
        assert on.stats().num_preemptions > 0  # preemption was forced
    for e in (on, off):
        e.check_integrity()
        assert e.stats().num_free_blocks == e.blocks.num_blocks  # cached blocks count as free


def test_sampled_requests_with_a_seed_are_unchanged_by_the_cache() -> None:
    prompts = shared_prefix_prompts(3, prefix_len=3 * BS, tail_len=2, seed=3)
    seeded = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    assert run(tiny(), prompts, seeded) == run(tiny(prefix_caching=False), prompts, seeded)


def test_cache_salt_keeps_tenants_apart() -> None:
    e = tiny()
    prompt = list(range(1, 4 * BS + 2))
    e.add_request("a", prompt, GREEDY, cache_salt="tenant-a")
    while e.has_unfinished_requests():
        e.step()
    e.add_request("b", prompt, GREEDY, cache_salt="tenant-b")
    assert e.scheduler.schedule().scheduled[0].start == 0  # another tenant: nothing reused
    e.abort_request("b")
    e.add_request("a2", prompt, GREEDY, cache_salt="tenant-a")
    assert e.scheduler.schedule().scheduled[0].start == 4 * BS


def test_a_migrated_request_s_kv_is_cached_at_the_destination() -> None:
    src, dst = tiny(), tiny()
    prompt = list(range(5, 5 + 3 * BS + 2))
    src.add_request("m", prompt, GREEDY)
    for _ in range(3):
        src.step()
    state = src.detach_request("m")
    n = -(-state.num_computed_tokens // BS)
    data = src.read_blocks(src.block_table("m")[:n])
    ids = dst.reserve("mig", n)
    dst.write_blocks(ids, data)
    dst.commit_request(state, "mig")
    src.release("m")
    assert dst.stats().num_cached_blocks == state.num_computed_tokens // BS
    dst.add_request("next", prompt, GREEDY)
    starts = {s.request.request_id: s.start for s in dst.scheduler.schedule().scheduled}
    assert starts["next"] == 3 * BS
    for e in (src, dst):
        e.check_integrity()


def test_a_destination_links_its_cached_prefix_into_a_reservation_and_an_abort_keeps_it_cached() -> None:
    """share_cached: the destination hashes the offered tokens with its own root; the cached leading
    run starts the reservation (reference-counted); only the rest is written; the greedy output
    equals the unmigrated run. Another salt links nothing; a released reservation leaves the
    blocks cached and the engine consistent."""
    prompt = list(range(7, 7 + 5 * BS + 1))
    dst = tiny()
    want = run(dst, [prompt])[0]  # caches the full blocks of the prompt and of its greedy output here
    src = tiny()
    src.add_request("m", prompt, GREEDY)
    for _ in range(4):
        src.step()
    offer = src.shareable_prefix("m")
    assert offer is not None and len(offer[0]) % BS == 0 and offer[1] == ""
    state = src.detach_request("m")
    n = -(-state.num_computed_tokens // BS)
    k = len(offer[0]) // BS  # the same greedy tokens: every full block of them is cached at dst
    assert k >= 5
    assert dst.share_cached("other", offer[0], "another tenant", n) == []  # salt: no hit
    # An aborted reservation: its shared blocks go back to the cache, nothing leaks.
    linked = dst.share_cached("abort", offer[0], "", n)
    assert len(linked) == k
    assert dst.release("abort") == k
    dst.check_integrity()
    assert dst.stats().num_cached_blocks >= k and dst.stats().num_free_blocks == dst.stats().num_blocks
    linked = dst.share_cached("mig", offer[0], "", n)
    assert len(linked) == k
    ids = linked + dst.reserve("mig", n - len(linked))
    table = src.block_table("m")
    dst.write_blocks(ids[k:], src.read_blocks(table[k:n]))  # only the blocks the destination lacks
    dst.commit_request(state, "mig")
    src.release("m")
    got = list(state.token_ids[len(prompt):])
    while dst.has_unfinished_requests():
        for o in dst.step():
            got += o.new_token_ids
        dst.check_integrity()
    assert got == want
    for e in (src, dst):
        e.check_integrity()
    off = tiny(prefix_caching=False)
    assert off.share_cached("x", offer[0], "", n) == []


def test_a_commit_refuses_linked_blocks_of_other_tokens_and_the_reservation_still_releases() -> None:
    """The committed state must own the tokens its linked cached blocks were linked for: another
    prompt's state (a buggy or lying source) is refused, and the shared blocks go back to the
    cache on release."""
    prompt = list(range(9, 9 + 4 * BS + 1))
    dst = tiny()
    run(dst, [prompt])
    src = tiny()
    other = [t + 1 for t in prompt]
    src.add_request("m", other, GREEDY)
    for _ in range(3):
        src.step()
    state = src.detach_request("m")
    n = -(-state.num_computed_tokens // BS)
    linked = dst.share_cached("mig", prompt, "", n)  # linked for `prompt`, committed with `other`
    assert len(linked) == 4
    dst.reserve("mig", n - len(linked))
    with pytest.raises(MigrationError, match="other tokens"):
        dst.commit_request(state, "mig")
    assert dst.release("mig") == n and "m" not in dst.requests
    dst.check_integrity()
    assert dst.stats().num_cached_blocks >= 4 and dst.stats().num_free_blocks == dst.stats().num_blocks


def test_blocks_a_migrated_request_shares_with_others_stay_on_the_source() -> None:
    """Two requests on the source share their prompt's cached blocks; moving one releases only its
    reference: the other keeps those blocks, continues unchanged, and the source stays consistent."""
    prompt = list(range(11, 11 + 5 * BS + 2))
    want = run(tiny(), [prompt])[0]
    src, dst = tiny(), tiny()
    src.add_request("a", prompt, GREEDY)
    got = {"a": [t for o in src.step() for t in o.new_token_ids], "b": []}  # a's prefill caches the prompt
    src.add_request("b", prompt, GREEDY)
    for _ in range(3):
        for o in src.step():
            got[o.request_id] += o.new_token_ids
    shared = src.block_table("a")[:5]
    assert src.block_table("b")[:5] == shared  # b reused a's prompt blocks
    state = src.detach_request("a")
    n = -(-state.num_computed_tokens // BS)
    ids = dst.reserve("mig", n)
    dst.write_blocks(ids, src.read_blocks(src.block_table("a")[:n]))
    dst.commit_request(state, "mig")
    src.release("a")
    src.check_integrity()
    assert src.block_table("b")[:5] == shared and all(src.blocks._refs[b] == 1 for b in shared)
    for e, rid in ((src, "b"), (dst, "a")):
        while e.has_unfinished_requests():
            for o in e.step():
                got[rid] += o.new_token_ids
        e.check_integrity()
    assert got["a"] == got["b"] == want


def test_the_sim_engine_prefills_only_uncached_tokens() -> None:
    cfg = EngineConfig(block_size=16, num_blocks=256, debug_checks=True)
    e = LLMEngine.sim(LLAMA7B_A10, cfg, clock="virtual")
    prompt = list(range(200))
    e.generate([prompt], SamplingParams(max_tokens=2))
    e.add_request("b", prompt, SamplingParams(max_tokens=2))
    e.step()
    assert e.executor.last_step_seconds == pytest.approx(LLAMA7B_A10.step_seconds(1, 200 - 192, 200, 8 * (192 + 4)))


# ---- cache_salt through the frontend ------------------------------------------------------------

def test_the_http_cache_salt_is_parsed_and_bad_ones_refused() -> None:
    from services.config import FrontendConfig
    from services.frontend.params import ApiError, RequestParser
    from tests.test_fuzz_properties import TOK

    parser = RequestParser(FrontendConfig(), TOK, "tiny", (), max_context=1024)
    body = {"model": "tiny", "prompt": "hello"}
    assert parser.completion(body).cache_salt == ""
    assert parser.completion({**body, "cache_salt": "tenant-a"}).cache_salt == "tenant-a"
    assert parser.chat({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                        "cache_salt": "t"}).cache_salt == "t"
    for bad in ("", 7, ["a"], "x" * 257):
        with pytest.raises(ApiError) as err:
            parser.completion({**body, "cache_salt": bad})
        assert err.value.status == 400 and "cache_salt" in str(err.value.body())
