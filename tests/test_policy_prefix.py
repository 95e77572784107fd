"""The prefix index and cache-aware dispatch (policy/prefix_index.py, policy/dispatch.py)."""

from __future__ import annotations

import pytest

from policy import DispatchState, InstanceLoad, PrefixIndex, dispatch, hit_tokens, named_policy


def inst(iid: str, free: int = 900, total: int = 1000, running: int = 1, queued: int = 0, **kw: object) -> InstanceLoad:
    return InstanceLoad(iid, total_blocks=total, free_blocks=free, num_running=running, num_waiting=0,
                        queued_prefill_tokens=queued, **kw)  # type: ignore[arg-type]


def test_match_counts_the_unbroken_leading_run_per_instance() -> None:
    idx = PrefixIndex()
    idx.stored("a", [1, 2, 3, 4])
    idx.stored("b", [1, 2, 9])
    idx.stored("c", [2, 3, 4])  # no first block: a run of 0
    assert idx.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert idx.match([1, 2, 3, 4, 5], candidates={"b"}) == {"b": 2}
    assert idx.match([7]) == {} and idx.match([]) == {}
    idx.removed("a", [2])
    assert idx.match([1, 2, 3]) == {"a": 1, "b": 2}
    idx.removed("zz", [1])  # an unknown instance: ignored
    idx.clear("b")
    assert idx.match([1, 2, 3]) == {"a": 1} and "b" not in idx.instances()


def test_a_flood_of_distinct_hashes_is_capped_per_instance() -> None:
    idx = PrefixIndex(max_entries_per_instance=100)
    idx.stored("a", range(10_000))
    idx.stored("b", [5, 6])
    assert idx.num_entries("a") == 100 and idx.num_entries() == 102
    assert idx.dropped == 9_900
    assert not idx.holds("a", 0) and idx.holds("a", 9_999)
    assert idx.match([5, 6]) == {"b": 2}  # a's old entries are gone from the holders too
    # A repeat refreshes: the refreshed entry outlives newer ones.
    idx.stored("a", [9_900])
    idx.stored("a", [20_000])
    assert idx.holds("a", 9_900) and not idx.holds("a", 9_901)


def test_hit_tokens_leaves_the_last_prompt_token_to_compute() -> None:
    assert hit_tokens(4, 100, 16) == 64
    assert hit_tokens(4, 64, 16) == 63
    assert hit_tokens(0, 64, 16) == 0 and hit_tokens(3, 0, 16) == 0


def test_cache_dispatch_goes_where_the_prefix_is() -> None:
    insts = [inst("a", free=950), inst("b", free=600)]  # a is freer
    cached = {"b": 100}  # b holds 1,600 of the 1,700-token prompt
    assert dispatch("load", insts, DispatchState(), 10, prompt_tokens=1700, cached_blocks=cached) == "a"
    assert dispatch("kvferry", insts, DispatchState(), 10, prompt_tokens=1700, cached_blocks=cached) == "b"
    assert dispatch("prefix", insts, DispatchState(), 10, prompt_tokens=1700, cached_blocks=cached) == "b"


def test_cache_dispatch_without_any_hit_is_load_dispatch() -> None:
    insts = [inst("a", free=500), inst("b", free=700, queued=5_000), inst("c", free=600)]
    for cached in (None, {}, {"a": 0}):
        assert dispatch("kvferry", insts, DispatchState(), 4, prompt_tokens=300, cached_blocks=cached) == \
            dispatch("load", insts, DispatchState(), 4) == "b"


def test_queued_prefill_outweighs_a_small_hit() -> None:
    insts = [inst("a", queued=4_000), inst("b")]
    cached = {"a": 10}  # 160 tokens cached on a, but 4,000 tokens of prefill queued there
    assert dispatch("kvferry", insts, DispatchState(), 10, prompt_tokens=1000, cached_blocks=cached) == "b"
    assert dispatch("prefix", insts, DispatchState(), 10, prompt_tokens=1000, cached_blocks=cached) == "a"


def test_a_hot_prefix_does_not_pile_onto_an_instance_short_of_memory() -> None:
    # a holds the prefix but is nearly full (freeness 50/10 = 5 < affinity_min_freeness 10).
    insts = [inst("a", free=50, running=10), inst("b", free=900)]
    cached = {"a": 100}
    assert dispatch("kvferry", insts, DispatchState(), 10, prompt_tokens=1700, cached_blocks=cached) == "b"
    assert dispatch("prefix", insts, DispatchState(), 10, prompt_tokens=1700, cached_blocks=cached) == "a"
    # When every instance is that busy, affinity decides again among those close to the freest.
    busy = [inst("a", free=50, running=10), inst("b", free=40, running=10)]
    assert dispatch("kvferry", busy, DispatchState(), 10, prompt_tokens=1700, cached_blocks={"b": 100}) == "b"
    cfg = named_policy("kvferry", affinity_freeness_band=0.0)  # only the freest
    assert dispatch(cfg, busy, DispatchState(), 10, prompt_tokens=1700, cached_blocks={"b": 100}) == "a"
    cfg = named_policy("kvferry", affinity_min_freeness=4.0, affinity_freeness_band=0.0)
    assert dispatch(cfg, busy, DispatchState(), 10, prompt_tokens=1700, cached_blocks={"b": 100}) == "b"


def test_prefill_dispatched_since_the_last_report_counts() -> None:
    state = DispatchState()
    insts = [inst("a"), inst("b")]
    cached = {"a": 60, "b": 60}  # both hold the 960-token prefix of a 1,000-token prompt
    first = dispatch("kvferry", insts, state, 63, prompt_tokens=1000, cached_blocks=cached)
    assert first == "a" and state.prefill_since_report["a"] == 40
    # A burst of cold prompts sent to a: the next cached request goes to b.
    state.on_dispatch("a", 10, prefill_tokens=2000)
    assert dispatch("kvferry", insts, state, 63, prompt_tokens=1000, cached_blocks=cached) == "b"
    state.on_report("a")
    assert "a" not in state.prefill_since_report


@pytest.mark.parametrize("policy", ["kvferry", "prefix"])
def test_cache_dispatch_skips_draining_dead_and_full_instances(policy: str) -> None:
    insts = [inst("a", draining=True), inst("b", alive=False), inst("c", max_running=1), inst("d", free=100)]
    cached = {"a": 50, "b": 50, "c": 50}
    assert dispatch(policy, insts, DispatchState(), 1, prompt_tokens=900, cached_blocks=cached) == "d"
    assert dispatch(policy, insts[:3], DispatchState(), 1, prompt_tokens=900, cached_blocks=cached) is None


def test_the_priority_load_cap_still_applies_to_cache_dispatch() -> None:
    from policy import RequestLoad
    hi = RequestLoad("h", priority=-1, num_blocks=10, num_tokens=160)
    # a already serves a high-priority request (so is capped at 100 blocks) and holds the prefix.
    insts = [inst("a", free=800, requests=(hi,)), inst("b", free=800)]
    cfg = named_policy("kvferry", affinity_min_freeness=100.0)
    got = dispatch(cfg, insts, DispatchState(), 4, priority=0, prompt_tokens=500, cached_blocks={"a": 30})
    assert got == "b"  # a normal request: capped, a falls under the floor whatever it caches
    got = dispatch(cfg, insts, DispatchState(), 4, priority=-1, prompt_tokens=500, cached_blocks={"a": 30})
    assert got == "a"  # a high-priority one sees a's memory whole, and its cache
