"""BlockManager: the paged KV cache's bookkeeping (no tensors, no model)."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager, blocks_for
from engine.errors import OutOfBlocksError


def test_blocks_for_rounds_up():
    """A partly filled block still counts as a whole block."""
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_hands_out_distinct_low_ids_first():
    """allocate appends exactly n fresh blocks to the owner's table."""
    bm = BlockManager(8, 4)
    assert bm.allocate("a", 3) == [0, 1, 2]
    assert bm.allocate("b", 2) == [3, 4]
    assert bm.allocate("a", 1) == [5]
    assert bm.table("a") == [0, 1, 2, 5]
    assert bm.num_owned("a") == 4 and bm.num_owned("b") == 2 and bm.num_owned("nobody") == 0
    assert bm.num_free == 2 and bm.num_used == 6
    assert sorted(bm.owners()) == ["a", "b"]
    bm.check_integrity({"a", "b"})


def test_grow_covers_tokens_and_is_idempotent():
    """grow(owner, n) makes the table cover n tokens; growing to a covered size adds nothing."""
    bm = BlockManager(10, 4)
    assert bm.grow("r", 1) == [0]
    assert bm.grow("r", 4) == []  # still one block
    assert bm.extra_blocks_needed("r", 5) == 1
    assert bm.grow("r", 5) == [1]
    assert bm.grow("r", 13) == [2, 3]
    assert bm.num_owned("r") == 4
    assert bm.grow("r", 3) == []  # never shrinks
    assert bm.extra_blocks_needed("r", 16) == 0
    bm.check_integrity({"r"})


def test_free_returns_blocks_for_reuse():
    """free gives every block of an owner back; freeing an unknown owner is a no-op."""
    bm = BlockManager(6, 2)
    bm.allocate("a", 4)
    bm.allocate("b", 2)
    assert bm.num_free == 0
    assert bm.free("a") == 4
    assert bm.free("a") == 0
    assert bm.free("ghost") == 0
    assert bm.num_free == 4 and bm.table("a") == []
    assert sorted(bm.allocate("c", 4)) == [0, 1, 2, 3]
    bm.check_integrity({"b", "c"})
    bm.free("b")
    bm.free("c")
    assert bm.num_used == 0
    bm.check_integrity(set())


def test_rename_moves_the_table():
    """A reservation's blocks become a request's blocks; the old key owns nothing after."""
    bm = BlockManager(8, 4)
    blocks = bm.allocate("resv", 3)
    bm.rename("resv", "req")
    assert bm.table("req") == blocks and bm.num_owned("resv") == 0
    bm.check_integrity({"req"})


def test_rename_onto_an_existing_owner_is_refused():
    """Renaming onto an owner that already holds blocks would lose blocks: OutOfBlocksError, no change."""
    bm = BlockManager(8, 4)
    bm.allocate("a", 2)
    bm.allocate("b", 1)
    with pytest.raises(OutOfBlocksError, match="b already owns blocks"):
        bm.rename("a", "b")
    assert bm.num_owned("a") == 2 and bm.num_owned("b") == 1
    bm.check_integrity({"a", "b"})


def test_out_of_blocks_is_all_or_nothing():
    """A request for more blocks than are free raises OutOfBlocksError and takes none."""
    bm = BlockManager(4, 4)
    bm.allocate("a", 3)
    with pytest.raises(OutOfBlocksError, match="needs 2 blocks, 1 free"):
        bm.allocate("b", 2)
    with pytest.raises(OutOfBlocksError):
        bm.grow("a", 4 * 5)
    assert bm.num_free == 1 and bm.num_owned("a") == 3 and bm.num_owned("b") == 0
    bm.check_integrity({"a"})


def test_empty_pool_is_an_error():
    """A cache with no block at all cannot serve anything."""
    with pytest.raises(OutOfBlocksError, match="no block"):
        BlockManager(0, 16)


def test_watermark_reserves_blocks_for_admissions_only():
    """can_grow keeps watermark_blocks free only when asked (admitting new prefills)."""
    bm = BlockManager(100, 4, watermark=0.1)
    assert bm.watermark_blocks == 10
    bm.allocate("a", 85)  # 15 free
    assert bm.can_grow("b", 4 * 5, keep_watermark=True)  # 5 <= 15 - 10
    assert not bm.can_grow("b", 4 * 6, keep_watermark=True)  # 6 > 5
    assert bm.can_grow("b", 4 * 15)  # running requests may use the watermark
    assert not bm.can_grow("b", 4 * 16)
    assert bm.can_grow("a", 4 * 85, keep_watermark=True)  # already covered: needs nothing


# ---- the integrity check catches corruption -------------------------------------------------


def _healthy() -> BlockManager:
    bm = BlockManager(8, 4)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm.check_integrity({"a", "b"})
    return bm


def test_integrity_catches_double_ownership():
    """One block in two tables."""
    bm = _healthy()
    bm._tables["b"].append(bm._tables["a"][0])
    with pytest.raises(AssertionError, match=r"block 0 is in 2 tables, its count says 1"):
        bm.check_integrity()


def test_integrity_catches_block_both_free_and_owned():
    """A block freed but still in a table."""
    bm = _healthy()
    bm._free.append(bm._tables["a"][0])
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity()


def test_integrity_catches_duplicate_in_free_list():
    bm = _healthy()
    bm._free.append(bm._free[0])
    with pytest.raises(AssertionError, match="twice in the free list"):
        bm.check_integrity()


def test_integrity_catches_leak():
    """A block neither free nor owned (dropped from a table without being freed)."""
    bm = _healthy()
    bm._tables["a"].pop()
    with pytest.raises(AssertionError, match="1 blocks are neither free nor owned"):
        bm.check_integrity()


def test_integrity_catches_out_of_range_block():
    bm = _healthy()
    bm._tables["a"].append(99)
    with pytest.raises(AssertionError, match="out-of-range block 99"):
        bm.check_integrity()
    bm._tables["a"][-1] = -1
    with pytest.raises(AssertionError, match="out-of-range block -1"):
        bm.check_integrity()


def test_integrity_catches_unknown_owner():
    """Blocks held by an owner the engine does not know (a leaked request or reservation)."""
    bm = _healthy()
    with pytest.raises(AssertionError, match=r"unknown owners: \['b'\]"):
        bm.check_integrity({"a"})


def test_kv_events_are_net_effects_and_reset_after_an_overflow() -> None:
    from engine.block_manager import KvEventBatch
    bm = BlockManager(4, 2)
    assert bm.drain_events() == KvEventBatch()  # off until enabled
    bm.allocate("a", 2)
    a0, a1 = bm.table("a")
    bm.register(a0, 10)
    bm.enable_events()
    assert bm.drain_events() == KvEventBatch(stored=[10], reset=True)  # first: the whole cache
    bm.register(a1, 11)
    bm.free("a")
    bm.allocate("b", 4)  # evicts both cached blocks
    assert bm.drain_events() == KvEventBatch(removed=[11, 10])  # the tail was released first
    b0 = bm.table("b")[0]
    bm.register(b0, 12)
    assert bm.drain_events() == KvEventBatch(stored=[12])
    assert not bm.drain_events()
    bm.free("b")
    for i in range(20):  # more changes than 4 x num_blocks pending: the next drain resets
        bm.allocate("c", 1)
        bm.register(bm.table("c")[0], 100 + i)
        bm.free("c")
        bm.allocate("d", 4)
        bm.free("d")
    assert bm.drain_events() == KvEventBatch(stored=bm.cached_hashes(), reset=True)
    bm.check_integrity()
