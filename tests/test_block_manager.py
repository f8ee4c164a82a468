"""Pool bookkeeping: model-free unit tests of BlockManager."""

import pytest

from hf_kvpool.core.block_manager import BlockManager
from hf_kvpool.core.hashing import ROOT, block_hashes, chain_hash, namespace_key

NS = namespace_key("m")


def chain(tokens, bs=2):
    return block_hashes(tokens, bs, NS)


def insert(manager, c, data_from=0):
    plan = manager.reserve(c, data_from)
    if plan is None:
        return []
    manager.publish(plan)
    return manager.match(c, pin=False)


def test_insert_and_match():
    m = BlockManager(8)
    c = chain([1, 2, 3, 4, 5, 6])
    ids = insert(m, c)
    assert len(ids) == 3 and m.num_stored == 3
    assert m.match(c, pin=False) == ids
    assert m.match(chain([1, 2, 3, 4, 9, 9]), pin=False) == ids[:2]
    assert m.match(chain([7, 7]), pin=False) == []
    m.check()


def test_shared_prefix_is_stored_once():
    m = BlockManager(8)
    insert(m, chain([1, 2, 3, 4]))
    insert(m, chain([1, 2, 3, 4, 5, 6]))
    assert m.num_stored == 3
    m.check()


def test_token_mismatch_on_hash_hit_is_a_miss():
    m = BlockManager(4)
    c = chain([1, 2])
    insert(m, c)
    forged = [(c[0][0], b"\x00" * 16)]  # same key, other tokens (a collision)
    assert m.match(forged, pin=False) == []


def test_lru_evicts_leaves_first():
    m = BlockManager(3)
    a = insert(m, chain([1, 1, 2, 2, 3, 3]))  # a chain of 3 fills the pool
    insert(m, chain([9, 9]))  # needs one block: the leaf of chain a goes, not its root
    assert m.evicted_blocks == 1
    assert m.match(chain([1, 1, 2, 2, 3, 3]), pin=False) == a[:2]
    m.check()


def test_lru_prefers_least_recently_used_chain():
    m = BlockManager(4)
    insert(m, chain([1, 1, 2, 2]))
    insert(m, chain([5, 5, 6, 6]))
    m.match(chain([1, 1, 2, 2]), pin=False)  # chain 1 used last
    insert(m, chain([7, 7]))
    assert len(m.match(chain([1, 1, 2, 2]), pin=False)) == 2
    assert len(m.match(chain([5, 5, 6, 6]), pin=False)) == 1  # chain 2 lost its leaf
    m.check()


def test_pinned_blocks_are_not_evicted():
    m = BlockManager(2)
    c = chain([1, 1, 2, 2])
    insert(m, c)
    pinned = m.match(c)  # pin=True
    assert m.reserve(chain([3, 3]), 0) is None  # nothing can be evicted
    m.unpin(pinned)
    assert m.reserve(chain([3, 3]), 0) is not None
    with pytest.raises(RuntimeError):
        m.unpin(pinned)


def test_abort_returns_blocks_unpublished():
    m = BlockManager(4)
    c = chain([1, 1, 2, 2])
    plan = m.reserve(c, 0)
    assert m.match(c, pin=False) == []  # reserved blocks are invisible
    m.abort(plan)
    assert m.num_free == 4 and m.num_stored == 0
    m.check()


def test_missing_ancestor_means_no_commit():
    m = BlockManager(4)
    c = chain([1, 1, 2, 2, 3, 3])
    # the caller holds K/V only from block 2 on, and blocks 0-1 are not in the pool
    assert m.reserve(c, 2) is None


def test_partial_reservation_when_full():
    m = BlockManager(2)
    ids = insert(m, chain([1, 1, 2, 2, 3, 3, 4, 4]))
    assert len(ids) == 2  # room for the first two blocks of the chain only
    m.check()


def test_clear():
    m = BlockManager(4)
    insert(m, chain([1, 1, 2, 2]))
    m.clear()
    assert m.num_stored == 0 and m.num_free == 4
    m.check()


def test_retire_frees_whole_chains_of_a_namespace_but_pinned_paths():
    old, live = namespace_key("old weights"), namespace_key("live")
    m = BlockManager(16)
    insert(m, block_hashes([1, 2, 3, 4, 5, 6], 2, old))
    insert(m, block_hashes([1, 2, 3, 4, 7, 8], 2, old))  # a branch: 4 blocks in the old namespace
    kept = insert(m, block_hashes([1, 2, 3, 4], 2, live))
    pinned = insert(m, block_hashes([9, 9, 9, 9], 2, old))
    m.pin(pinned)  # a reader holds this chain: it and its ancestors stay

    def dead(blk):
        return chain_hash(ROOT, old, blk.tokens) == blk.key

    assert m.retire(dead) == 4
    assert m.num_stored == len(kept) + len(pinned) and m.retired_blocks == 4 and m.evicted_blocks == 0
    assert m.match(block_hashes([1, 2, 3, 4], 2, live), pin=False) == kept
    assert m.match(block_hashes([1, 2], 2, old), pin=False) == []
    m.check()
    m.unpin(pinned)
    assert m.retire(dead) == 2 and m.num_stored == len(kept)
    m.check()


# ------------------------------------------------------------------ commits from an anchor
def test_commits_from_an_anchor_walk_only_new_blocks():
    """Decoding commits one block at a time from the anchor the last commit returned: the same
    blocks as a commit from the root, invariants held, and no look-up of the blocks before it."""
    m = BlockManager(16)
    c = chain(list(range(20)))  # 10 blocks
    plan, _ = m.reserve_after(c, 0, None, end=4)
    anchor = m.publish(plan)
    assert anchor.index == 3 and m.live(anchor, c)
    looked_up: list[bytes] = []
    spy = type("Spy", (dict,), {"get": lambda self, k: looked_up.append(k) or dict.get(self, k)})
    m._by_key = spy(m._by_key)
    for end in range(5, 11):
        plan, _ = m.reserve_after(c, end - 1, anchor, end=end)
        assert plan.from_anchor and plan.first == end - 1 and len(plan.block_ids) == 1
        anchor = m.publish(plan)
        assert anchor.index == end - 1
        m.check()
    assert looked_up == [key for key, _ in c[4:10] for _ in "rp"]  # its new block only (reserve, publish)
    m._by_key = dict(m._by_key)
    assert len(m.match(c, pin=False)) == 10
    # nothing new: no plan, and the anchor of the deepest stored block
    plan, again = m.reserve_after(c, 10, anchor, end=10)
    assert plan is None and again.index == 9 and again.block is anchor.block


def test_a_stale_anchor_is_not_trusted():
    """The anchor's block was evicted and its id re-used by another chain: the commit walks from the
    root, finds the chain's blocks missing and commits nothing (its K/V for them is gone)."""
    m = BlockManager(3)
    c = chain([1, 2, 3, 4, 5, 6, 7, 8])
    plan, _ = m.reserve_after(c, 0, None, end=2)
    anchor = m.publish(plan)
    insert(m, chain([9, 9, 9, 9, 9, 9]))  # evicts c's blocks, re-uses their ids
    assert not m.live(anchor, c)
    assert anchor.block.block_id in {b.block_id for b in m.blocks()}  # the id is in use again
    plan, deepest = m.reserve_after(c, 2, anchor, end=3)
    assert plan is None and deepest is None
    m.check()


def test_recency_order_matches_an_ordered_list():
    """lru.Recency under random appends, moves, inserts before and deletions (against a list)."""
    import random

    from hf_kvpool.core.lru import Recency

    rng = random.Random(0)
    order, ref = Recency(), []
    for step in range(3000):
        op = rng.random()
        if op < 0.3 or not ref:
            i = step
            order[i] = None
            ref.append(i)
        elif op < 0.5:
            i = rng.choice(ref)
            order.move_to_end(i)
            ref.remove(i)
            ref.append(i)
        elif op < 0.7:
            i, at = step, rng.choice(ref)
            order.insert_before(i, at)
            ref.insert(ref.index(at), i)
        else:
            i = rng.choice(ref)
            del order[i]
            ref.remove(i)
        assert len(order) == len(ref)
    assert list(order) == ref and list(reversed(order)) == ref[::-1]
    assert all(i in order for i in ref) and -1 not in order


def test_two_writers_of_the_same_blocks_publish_them_once():
    """Plans are written outside the pool's lock, so two writers may reserve the same missing blocks:
    the second publish frees its ids and keeps the first writer's blocks."""
    m = BlockManager(8)
    c = chain([1, 2, 3, 4, 5, 6])
    first, second = m.reserve(c, 0), m.reserve(c, 0)
    assert len(first.block_ids) == len(second.block_ids) == 3 and m.num_free == 2
    m.publish(first)
    anchor = m.publish(second)
    assert first.published == first.block_ids and second.published == []
    assert anchor.block.block_id == first.block_ids[-1]
    assert m.num_stored == 3 and m.num_free == 5 and m.match(c, pin=False) == first.block_ids
    m.check()
