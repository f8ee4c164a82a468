"""KVPool with real tensors (BlockStore, torch backend): a hit returns the K/V of exactly those tokens.

Every value written encodes (namespace, token id, position, layer, K/V, head, dim)
(``kv_encoding.py``), over three layers in two storage groups. Random sequences of commits (left-padded
batches, each row committed as ``tracking.py`` does) and fetches (left-padded batches) run on pools of
1-16 blocks with block sizes 1, 2 and 4, so blocks are evicted and their storage rewritten all the time.
Every fetch must return, column by column, the encoding of the row's token at that position (pad
columns zero), as many columns as the bookkeeping says match, and leave nothing pinned.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kv_encoding import batch_kv, block_bytes, chain, check_fetched

from hf_kvpool import KVPool

SOAK = os.environ.get("HF_KVPOOL_SOAK") == "1"
EXAMPLES = 150

BASES = [
    [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3],
    [0, 1, 2, 3, 3, 3, 1, 1, 0, 0, 2, 1],
    [0, 1, 3, 3, 2, 0, 1, 2, 1, 0, 1, 2],
    [2, 2, 0, 1, 2, 0, 1, 1, 3, 0, 0, 2],
]
rows_st = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.integers(0, len(BASES) - 1),
        st.one_of(st.integers(1, 12), st.just(12)),
        st.lists(st.integers(0, 3), max_size=3),
    ),
    min_size=1,
    max_size=3,
)
capacities = st.sampled_from([1, 2, 3, 5, 8, 16])
# (kind, rows, trim: fewer columns allowed, repeat: a fetch of the rows of an earlier commit)
ops_st = st.lists(
    st.tuples(st.sampled_from(["commit", "fetch"]), rows_st, st.integers(0, 3), st.integers(0, 2)),
    min_size=1,
    max_size=12,
)


def _rows(spec):
    """Row specs -> (namespace per row, tokens per row, left pads)."""
    ns = [s[0] for s in spec]
    rows = [BASES[b][:n] + extra for _, b, n, extra in spec]
    length = max(len(r) for r in rows)
    return ns, rows, [length - len(r) for r in rows]


def run_ops(pool: KVPool, ops) -> dict:
    bs = pool.block_size
    seen = {"commits": 0, "fetches": 0, "hit_tokens": 0, "checked_values": 0}
    committed = []
    for kind, spec, trim, repeat in ops:
        if kind == "fetch" and repeat and committed:
            spec = committed[-repeat % len(committed)]
        elif kind == "commit":
            committed.append(spec)
        ns, rows, pads = _rows(spec)
        chains = [chain(n, r, bs) for n, r in zip(ns, rows)]
        if kind == "commit":
            # one K/V batch per namespace (a call has one namespace); rows of the other are skipped
            for space in set(ns):
                layer_kv = batch_kv(space, [r if n == space else [] for n, r in zip(ns, rows)], pads)
                for b, (n, c) in enumerate(zip(ns, chains)):
                    if n == space and c:
                        written = pool.commit(c, 0, layer_kv, b, pads[b])
                        assert 0 <= written <= len(c)
                        seen["commits"] += 1
        else:
            m = pool._device.manager if pool._device is not None else None
            matched = [len(m._walk(c)) for c in chains] if m is not None else [0] * len(rows)
            length = pads[0] + len(rows[0])
            max_columns = length - 1 - trim
            fetched = pool.fetch(chains, pads, sum(map(len, rows)), max_columns)
            seen["fetches"] += 1
            want = min(min(p + k * bs for p, k in zip(pads, matched)), max_columns)
            if m is None or want <= 0 or all(want <= p for p in pads):
                assert fetched.columns == 0 and fetched.streams is None
            else:
                assert fetched.columns == want
                check_fetched(fetched, ns, rows, pads)
                seen["hit_tokens"] += sum(max(0, want - p) for p in pads)
                seen["checked_values"] += sum(t.numel() for t in fetched.streams)
        if pool._device is not None:
            pool._device.manager.check()
            assert all(blk.pins == 0 for blk in pool._device.manager.blocks())
            stats = pool.stats()
            assert stats.stored_blocks <= stats.capacity_blocks
            assert stats.committed_blocks - stats.evicted_blocks == stats.stored_blocks
    return seen


@settings(max_examples=EXAMPLES, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4]), capacity=capacities, ops=ops_st)
def test_hit_returns_exactly_the_kv_of_those_tokens(block_size, capacity, ops):
    pool = KVPool(block_size=block_size, capacity_bytes=capacity * block_bytes(block_size), backend="torch")
    run_ops(pool, ops)
    if pool._device is not None:
        assert pool.stats().capacity_blocks == capacity


def test_repeated_prefix_is_served_at_its_positions():
    """A deterministic case: a prompt committed, then looked up in a padded batch with a longer row."""
    pool = KVPool(block_size=2, backend="torch")
    ops = [
        ("commit", [(0, 0, 12, [])], 0, 0),
        (
            "fetch",
            [(0, 0, 9, []), (0, 0, 12, [1, 1])],
            0,
            0,
        ),  # row 0 padded by 5: columns 5.. hold tokens 0..
        ("fetch", [(1, 0, 12, [])], 0, 0),  # the other namespace: a miss
    ]
    seen = run_ops(pool, ops)
    assert seen["hit_tokens"] > 0
    stats = pool.stats()
    assert stats.stored_blocks == 6 and stats.lookups == 2


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: set HF_KVPOOL_SOAK=1")
@settings(max_examples=2000, deadline=None, database=None)
@given(block_size=st.sampled_from([1, 2, 4]), capacity=capacities, ops=ops_st)
def test_hit_returns_exactly_the_kv_of_those_tokens_soak(block_size, capacity, ops):
    pool = KVPool(block_size=block_size, capacity_bytes=capacity * block_bytes(block_size), backend="torch")
    run_ops(pool, ops)
