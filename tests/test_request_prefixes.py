"""The scheduler's store of dispatched requests' prompt hashes (policy/request_prefixes.py):
bounded in hashes, matched once per request per migration round, against the live KV index."""

from __future__ import annotations

import pytest

from policy.request_prefixes import RequestPrefixes
from protocol.kv_hash import prompt_hashes, root_from_namespace
from services.scheduler.kv_index import KvIndex

NS, BS = 77, 16


def hashes(tokens: list[int], salt: str = "") -> list[int]:
    return prompt_hashes(tokens, BS, root_from_namespace(NS, salt))


def test_prefix_blocks_counts_the_leading_blocks_each_instance_holds():
    from protocol.to_scheduler import KvEvents

    kv = KvIndex()
    for wid in ("w0", "w1"):
        kv.register(wid, NS, BS, now=0.0)
    prompt = list(range(100))  # 6 full blocks
    h = hashes(prompt)
    assert kv.apply(KvEvents(worker_id="w0", seq=0, reset=True, stored=h[:4]), now=0.0) is None
    assert kv.apply(KvEvents(worker_id="w1", seq=0, reset=True, stored=h[1:]), now=0.0) is None  # no first block
    store = RequestPrefixes()
    store.remember("r", NS, BS, h)
    lookup = store.prefix_blocks(kv.match)
    assert (lookup("r", "w0"), lookup("r", "w1"), lookup("r", "w2")) == (4, 0, 0)
    assert lookup("unknown", "w0") == 0
    # Another namespace (another model or block size) matches nothing.
    store.remember("other", NS + 1, BS, h)
    assert store.prefix_blocks(kv.match)("other", "w0") == 0


def test_each_request_is_matched_once_per_round():
    calls: list[int] = []

    def match(hs, ns, bs):
        calls.append(len(hs))
        return {"w0": 2}

    store = RequestPrefixes()
    store.remember("r", NS, BS, [1, 2, 3])
    lookup = store.prefix_blocks(match)
    assert [lookup("r", w) for w in ("w0", "w1", "w0")] == [2, 0, 2]
    assert calls == [3]
    store.prefix_blocks(match)("r", "w0")  # a new round matches again (the caches moved on)
    assert calls == [3, 3]


def test_bounded_by_total_hashes_oldest_forgotten_first():
    store = RequestPrefixes(max_hashes=10)
    store.remember("a", NS, BS, [1] * 4)
    store.remember("b", NS, BS, [2] * 4)
    store.remember("c", NS, BS, [3] * 4)  # 12 > 10: "a" goes
    assert len(store) == 2 and store.num_hashes == 8
    store.remember("b", NS, BS, [4] * 2)  # a request dispatched again replaces its entry
    assert len(store) == 2 and store.num_hashes == 6
    store.remember("huge", NS, BS, [5] * 11)  # more than the whole budget: not kept, nothing evicted
    assert len(store) == 2
    store.remember("none", NS, BS, [])
    store.remember("no-namespace", 0, BS, [1])
    assert len(store) == 2
    store.forget("c")
    store.forget("c")
    assert len(store) == 1 and store.num_hashes == 2
    with pytest.raises(ValueError):
        RequestPrefixes(max_hashes=0)
