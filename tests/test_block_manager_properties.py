"""Property-based tests of the pool bookkeeping (``BlockManager``) against a reference model.

A hypothesis state machine runs random sequences of inserts (reserve then publish, or reserve then
abort, with lookups and evictions in between), lookups (match with pins, later unpin), explicit
evictions and clears, on a manager of 1-12 blocks. A small reference model (plain dicts, LRU by a
logical clock) predicts every answer. After every step:

- capacity is never exceeded (stored + reserved + free == num_blocks, no id in two places);
- a block pinned by a lookup, or a plan's pinned parent, is never evicted or overwritten;
- a hit returns exactly the blocks of those tokens: every returned block holds the tokens, parent
  and *namespace + whole token prefix* of the query at that depth, and the hit is the longest one
  the reference model knows of (same tokens under two namespaces, i.e. two salts, never share);
- every stored block's ancestors are stored (``check()``), and eviction takes the least recently
  used unpinned leaf, as the reference predicts;
- the counters (evicted, published, stored, free) equal the reference's.

Token ids come from a 3-letter alphabet with 2-token blocks, so chains share prefixes constantly.
``HF_KVPOOL_SOAK=1`` runs many more examples (marked ``slow``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hf_kvpool.core.block_manager import BlockManager, CommitPlan
from hf_kvpool.core.hashing import block_hashes, namespace_key

SOAK = os.environ.get("HF_KVPOOL_SOAK") == "1"
BS = 2
NAMESPACES = [namespace_key("model", b""), namespace_key("model", "salt-b")]

EXAMPLES = 200
STEPS = 40
COUNTS: Counter = Counter()  # what the state machine exercised (read by the report script)

# prompts: prefixes of a few base prompts that share leading blocks (so lookups hit and chains
# branch), or random lists
BASES = [
    [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2],
    [0, 1, 2, 0, 2, 2, 1, 1, 0, 0, 2, 1],  # shares 2 blocks with the first
    [0, 1, 1, 1, 0, 0, 2, 2, 1, 0, 1, 2],  # shares 1 block
    [2, 2, 0, 1, 2, 0, 1, 1, 1, 0, 0, 2],
]
token_lists = st.one_of(
    st.builds(lambda b, n: BASES[b][:n], st.integers(0, len(BASES) - 1), st.integers(0, 12)),
    st.lists(st.integers(0, 2), max_size=12),
)
data_froms = st.sampled_from([0, 0, 0, 1, 2, 4])
picks = st.one_of(st.none(), st.integers(0, 1000), st.integers(0, 1000))


@dataclass
class RefBlock:
    key: bytes
    tokens: bytes
    parent: int | None
    prefix: tuple  # (namespace index, every token id from the start of the chain to the end of this block)
    children: int = 0
    pins: int = 0
    used: int = 0  # logical time of the last touch


def make_chain(ns: int, tokens: list[int]):
    return block_hashes(tokens, BS, NAMESPACES[ns])


def publish(m: BlockManager, plan) -> list[int]:
    """Publish a plan; returns the ids of its whole chain as now stored."""
    m.publish(plan)
    return m.match(plan.chain, pin=False)


class Reference:
    """What the manager should hold: published blocks, their pins, LRU by a logical clock."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.blocks: dict[int, RefBlock] = {}
        self.clock = 0
        self.evicted = 0
        self.published = 0

    def walk(self, chain) -> list[int]:
        by_key = {b.key: i for i, b in self.blocks.items()}
        ids, parent = [], None
        for key, tokens in chain:
            i = by_key.get(key)
            if i is None or self.blocks[i].tokens != tokens or self.blocks[i].parent != parent:
                break
            ids.append(i)
            parent = i
        return ids

    def touch(self, ids: list[int]) -> None:
        for i in reversed(ids):  # deepest first, so every block ends up before its parent
            self.clock += 1
            self.blocks[i].used = self.clock

    def victim(self) -> int | None:
        """The block an eviction must take: least recently used unpinned leaf."""
        leaves = [(b.used, i) for i, b in self.blocks.items() if b.pins == 0 and b.children == 0]
        return min(leaves)[1] if leaves else None

    def evict(self, i: int) -> None:
        blk = self.blocks.pop(i)
        if blk.parent is not None:
            self.blocks[blk.parent].children -= 1
        self.evicted += 1


@dataclass
class Lookup:
    ids: list[int]
    expected: list[tuple[bytes, bytes, tuple]]  # (key, tokens, prefix) of each pinned block


@dataclass
class Pending:
    plan: CommitPlan
    ns: int
    tokens: list[int]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m: BlockManager | None = None
        self.ref: Reference | None = None
        self.pending: Pending | None = None
        self.held: list[Lookup] = []  # lookups whose blocks are still pinned (a gather in progress)
        self.seen: list[tuple[int, list[int]]] = []  # prompts inserted so far (lookups often reuse them)

    @initialize(
        num_blocks=st.integers(1, 12),
        preload=st.lists(st.tuples(st.integers(0, 1), st.integers(0, len(BASES) - 1)), max_size=3),
    )
    def setup(self, num_blocks, preload):
        """A manager of ``num_blocks``, with up to 3 base prompts already published."""
        self.m = BlockManager(num_blocks)
        self.ref = Reference(num_blocks)
        COUNTS["machines"] += 1
        for ns, base in preload:
            self.insert(ns, BASES[base], 0, "publish")

    # ------------------------------------------------------------------ helpers
    def _expect_evictions(self, fn):
        """Run ``fn`` (which may evict); check it evicted exactly the blocks the reference predicts."""
        before = set(self.m._blocks)
        evicted_before = self.m.evicted_blocks
        result = fn()
        gone = before - set(self.m._blocks)
        assert self.m.evicted_blocks - evicted_before == len(gone)
        return result, gone

    def _prefix_of(self, ns: int, tokens: list[int], depth: int) -> tuple:
        return (ns, tuple(tokens[: (depth + 1) * BS]))

    # ------------------------------------------------------------------ inserts
    @precondition(lambda self: self.pending is None)
    @rule(
        ns=st.integers(0, 1),
        tokens=token_lists,
        data_from=data_froms,
        then=st.sampled_from(["publish", "publish", "publish", "abort", "hold"]),
    )
    def insert(self, ns, tokens, data_from, then):
        """reserve(); then publish() or abort() at once, or hold the plan while other rules run."""
        self.seen.append((ns, tokens))
        self.reserve(ns, tokens, data_from)
        if self.pending is not None and then != "hold":
            self.publish() if then == "publish" else self.abort()

    def reserve(self, ns, tokens, data_from):
        chain = make_chain(ns, tokens)
        ref = self.ref
        present = ref.walk(chain)
        ref.touch(present)
        first = len(present)
        if first < data_from or first == len(chain):
            plan = self.m.reserve(chain, data_from)
            assert plan is None
            return
        parent = present[-1] if present else None
        if parent is not None:
            ref.blocks[parent].pins += 1
        # simulate the reservation: free ids first, then LRU unpinned leaves
        free = self.m.num_free
        want = len(chain) - first
        victims = []
        while len(victims) + min(free, want) < want:
            v = ref.victim()
            if v is None:
                break
            victims.append(v)
            ref.evict(v)
        n_expected = min(want, free + len(victims))
        plan, gone = self._expect_evictions(lambda: self.m.reserve(chain, data_from))
        assert gone == set(victims), (gone, victims)
        COUNTS["reserve_evictions"] += len(victims)
        COUNTS["reserves"] += 1
        if n_expected == 0:
            assert plan is None
            if parent is not None:
                ref.blocks[parent].pins -= 1
            return
        assert plan is not None
        assert plan.first == first and plan.parent == parent and len(plan.block_ids) == n_expected
        assert len(set(plan.block_ids)) == n_expected
        assert not set(plan.block_ids) & set(self.m._blocks), "a reserved id is still a published block"
        # reserved blocks are invisible to lookups until published
        assert self.m._walk(chain) == present
        self.pending = Pending(plan, ns, tokens)

    @precondition(lambda self: self.pending is not None)
    @rule(ok=st.booleans())
    def finish(self, ok):
        """Publish or abort the plan held by insert(then="hold")."""
        self.publish() if ok else self.abort()

    def publish(self):
        pending, self.pending = self.pending, None
        plan, ref = pending.plan, self.ref
        parent = plan.parent
        new_ids = list(plan.block_ids)
        for offset, bid in enumerate(new_ids):
            depth = plan.first + offset
            key, tokens = plan.chain[depth]
            assert bid not in ref.blocks
            ref.clock += 1
            ref.blocks[bid] = RefBlock(
                key, tokens, parent, self._prefix_of(pending.ns, pending.tokens, depth), used=ref.clock
            )
            if parent is not None:
                ref.blocks[parent].children += 1
            parent = bid
        ref.published += len(new_ids)
        COUNTS["published_blocks"] += len(new_ids)
        if plan.parent is not None:
            ref.blocks[plan.parent].pins -= 1
        expected = ref.walk(plan.chain)
        ref.touch(expected)
        self.m.publish(plan)
        assert self.m.match(plan.chain, pin=False) == expected
        assert expected[plan.first : plan.first + len(new_ids)] == new_ids

    def abort(self):
        pending, self.pending = self.pending, None
        plan = pending.plan
        if plan.parent is not None:
            self.ref.blocks[plan.parent].pins -= 1
        free = self.m.num_free
        n = len(plan.block_ids)
        self.m.abort(plan)
        assert self.m.num_free == free + n

    # ------------------------------------------------------------------ lookups
    def _query(self, ns, tokens, pick):
        """Half the lookups take a prompt inserted earlier, cut or extended (so that they hit)."""
        if pick is None or not self.seen:
            return ns, tokens
        seen_ns, seen_tokens = self.seen[pick % len(self.seen)]
        cut = len(seen_tokens) if pick % 2 else (pick // 7) % (len(seen_tokens) + 1)
        return seen_ns, seen_tokens[:cut] + tokens[: pick % 3]

    @rule(ns=st.integers(0, 1), tokens=token_lists, pick=picks, pin=st.booleans())
    def match(self, ns, tokens, pick, pin):
        ns, tokens = self._query(ns, tokens, pick)
        chain = make_chain(ns, tokens)
        expected = self.ref.walk(chain)
        self.ref.touch(expected)
        ids = self.m.match(chain, pin=pin)
        assert ids == expected
        COUNTS["lookups"] += 1
        COUNTS["lookup_hits"] += bool(ids)
        COUNTS["lookup_store_nonempty"] += self.m.num_stored > 0
        for depth, i in enumerate(ids):
            blk = self.m.block(i)
            # exactly the blocks of those tokens: key, tokens, parent, and the whole prefix + namespace
            assert (blk.key, blk.tokens) == chain[depth]
            assert blk.parent == (ids[depth - 1] if depth else None)
            assert self.ref.blocks[i].prefix == self._prefix_of(ns, tokens, depth)
        if not pin:
            return
        for i in ids:
            self.ref.blocks[i].pins += 1
        self.held.append(
            Lookup(
                ids, [(self.m.block(i).key, self.m.block(i).tokens, self.ref.blocks[i].prefix) for i in ids]
            )
        )

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 50))
    def unpin(self, index):
        lookup = self.held.pop(index % len(self.held))
        self.m.unpin(lookup.ids)
        for i in lookup.ids:
            self.ref.blocks[i].pins -= 1

    # ------------------------------------------------------------------ evictions
    @rule(dice=st.integers(0, 2))
    def evict_one(self, dice):
        if dice:  # one in three: explicit evictions would otherwise keep the pool nearly empty
            return
        v = self.ref.victim()
        ok, gone = self._expect_evictions(self.m._evict_one)
        assert ok == (v is not None)
        if v is not None:
            assert gone == {v}
            self.ref.evict(v)

    @rule(dice=st.integers(0, 9))
    def clear(self, dice):
        if dice:  # rare: a clear empties the pool
            return
        if any(b.pins for b in self.ref.blocks.values()):
            with pytest.raises(RuntimeError, match="lookup holds blocks"):
                self.m.clear()
        else:
            self.m.clear()
            self.ref.blocks.clear()

    # ------------------------------------------------------------------ invariants
    @invariant()
    def consistent(self):
        m, ref = self.m, self.ref
        if m is None:
            return
        COUNTS["steps"] += 1
        m.check()
        reserved = set(self.pending.plan.block_ids) if self.pending else set()
        # capacity: every id is in exactly one place
        assert m.num_stored + m.num_free + len(reserved) == m.num_blocks
        assert m.num_stored <= m.num_blocks
        assert m._reserved == reserved
        assert len(set(m._free)) == m.num_free and not set(m._free) & (set(m._blocks) | reserved)
        # the published blocks are the reference's, field by field
        assert set(m._blocks) == set(ref.blocks)
        for i, r in ref.blocks.items():
            b = m.block(i)
            assert (b.key, b.tokens, b.parent, b.children, b.pins) == (
                r.key,
                r.tokens,
                r.parent,
                r.children,
                r.pins,
            )
        # LRU order is the reference's clock order
        assert [b.block_id for b in m.blocks()] == sorted(ref.blocks, key=lambda i: ref.blocks[i].used)
        # a namespace + token prefix is held by at most one block (two salts never share one)
        prefixes = [r.prefix for r in ref.blocks.values()]
        assert len(prefixes) == len(set(prefixes))
        # no reachable chain has a missing ancestor
        for r in ref.blocks.values():
            depth, p = 0, r.parent
            while p is not None:
                assert p in ref.blocks
                p, depth = ref.blocks[p].parent, depth + 1
            assert len(r.prefix[1]) == (depth + 1) * BS
        # counters
        assert m.evicted_blocks == ref.evicted and m.published_blocks == ref.published

    @invariant()
    def pinned_blocks_stay(self):
        """Blocks pinned by a lookup (or a plan's parent) are never evicted or overwritten."""
        if self.m is None:
            return
        for lookup in self.held:
            for i, (key, tokens, prefix) in zip(lookup.ids, lookup.expected):
                assert i in self.m._blocks, f"pinned block {i} was evicted"
                blk = self.m.block(i)
                assert (blk.key, blk.tokens) == (key, tokens) and self.ref.blocks[i].prefix == prefix
                assert blk.pins > 0
        if self.pending and self.pending.plan.parent is not None:
            assert self.pending.plan.parent in self.m._blocks

    def teardown(self):
        # every lookup can be released: afterwards nothing is pinned and clear() works
        if self.m is None:
            return
        for lookup in self.held:
            self.m.unpin(lookup.ids)
        if self.pending is not None:
            self.m.abort(self.pending.plan)
        assert all(b.pins == 0 for b in self.m.blocks())
        self.m.clear()
        self.m.check()
        assert self.m.num_free == self.m.num_blocks


BlockManagerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_block_manager_state_machine = BlockManagerMachine.TestCase


@pytest.mark.slow
@pytest.mark.skipif(not SOAK, reason="soak run: set HF_KVPOOL_SOAK=1")
def test_block_manager_state_machine_soak():
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        BlockManagerMachine,
        settings=settings(max_examples=3000, stateful_step_count=80, deadline=None, database=None),
    )


# ---------------------------------------------------------------------- op lists through @given
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 1), token_lists, st.booleans()),
        st.tuples(st.just("lookup"), st.integers(0, 1), token_lists, st.booleans()),
        st.tuples(st.just("unpin_oldest")),
    ),
    max_size=40,
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(num_blocks=st.integers(1, 6), ops=ops)
def test_random_op_lists_keep_invariants(num_blocks, ops):
    """The same invariants over flat op lists (insert = reserve + publish or abort, in one go), with
    a brute-force reference for what a lookup must find: the longest prefix whose blocks were
    published and not evicted since, recorded by (namespace, token prefix)."""
    m = BlockManager(num_blocks)
    held: list[list[int]] = []
    for op in ops:
        if op[0] == "insert":
            _, ns, tokens, ok = op
            chain = make_chain(ns, tokens)
            plan = m.reserve(chain, 0)
            if plan is not None:
                assert len(plan.block_ids) <= num_blocks
                m.publish(plan) if ok else m.abort(plan)
        elif op[0] == "lookup":
            _, ns, tokens, keep = op
            chain = make_chain(ns, tokens)
            ids = m.match(chain, pin=keep)
            for depth, i in enumerate(ids):
                assert (m.block(i).key, m.block(i).tokens) == chain[depth]
            # the hit is the longest: the next block of the chain is not stored under that parent
            if len(ids) < len(chain):
                key, tokens_ = chain[len(ids)]
                parent = ids[-1] if ids else None
                assert not any(
                    b.tokens == tokens_ and b.parent == parent and b.key == key for b in m.blocks()
                )
            if keep:
                held.append(ids)
        elif held:
            m.unpin(held.pop(0))
        m.check()
        assert m.num_stored <= num_blocks
        for ids in held:
            assert all(i in m._blocks and m.block(i).pins > 0 for i in ids)
    for ids in held:
        m.unpin(ids)
    assert all(b.pins == 0 for b in m.blocks())


# ---------------------------------------------------------------------- targeted edge cases
def test_unpin_more_often_than_pinned_is_an_error():
    m = BlockManager(4)
    chain = make_chain(0, [1, 2, 1, 2])
    m.publish(m.reserve(chain, 0))
    ids = m.match(chain)
    m.unpin(ids)
    with pytest.raises(RuntimeError, match="unpinned more often than pinned"):
        m.unpin(ids)
    m.check()


def test_interrupted_reservation_returns_its_blocks(monkeypatch):
    """A KeyboardInterrupt while reserve() evicts leaves no block reserved and no block pinned."""
    m = BlockManager(3)
    (parent,) = publish(m, m.reserve(make_chain(1, [2, 2]), 0))
    m.publish(m.reserve(make_chain(0, [0, 0, 1, 1]), 0))  # the pool is full
    real_evict = m._evict_one
    calls = []

    def evict_then_interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evict()

    monkeypatch.setattr(m, "_evict_one", evict_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        m.reserve(make_chain(1, [2, 2, 0, 0, 1, 1]), 0)  # 2 blocks after `parent`: evicts one, then stops
    monkeypatch.undo()
    m.check()
    assert not m._reserved and all(b.pins == 0 for b in m.blocks())  # `parent` was pinned, now released
    assert (m.num_stored, m.num_free) == (2, 1)


def test_hash_collision_is_a_miss():
    """Two blocks under one key (a forced collision): a lookup returns only the block whose stored
    tokens and parent match, never the other one."""
    m = BlockManager(4)
    key = b"k" * 16
    a = [(key, b"A" * 8)]
    b = [(key, b"B" * 8)]
    ids_a = publish(m, m.reserve(a, 0))
    assert m.match(b, pin=False) == []
    ids_b = publish(m, m.reserve(b, 0))
    assert ids_a != ids_b
    assert m.match(b, pin=False) == ids_b
    assert m.match(a, pin=False) == []  # shadowed, never served as b's
    assert m.block(ids_b[0]).tokens == b"B" * 8


@settings(max_examples=50, deadline=None)
@given(tokens=st.lists(st.integers(0, 2), min_size=2, max_size=10))
def test_same_tokens_under_two_namespaces_are_distinct_blocks(tokens):
    assume(len(tokens) >= BS)
    m = BlockManager(16)
    ids = [publish(m, m.reserve(make_chain(ns, tokens), 0)) for ns in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == len(tokens) // BS
    assert not set(ids[0]) & set(ids[1])
    for ns in (0, 1):
        assert m.match(make_chain(ns, tokens), pin=False) == ids[ns]
    m.check()
