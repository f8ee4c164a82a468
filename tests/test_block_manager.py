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
