"""Pool bookkeeping: which block holds which tokens. Pure Python, no tensors.

Blocks are published under a chained key (``hashing.py``). A published block records its parent,
its token ids and how many published children it has; ``_insert`` is the one place a block becomes
visible, and pins (blocks a reader holds: never evicted) are counted here only. Eviction is least-recently-used among
*leaves* (blocks without published children), so a chain loses its descendants before its
ancestors and no reachable chain has a missing ancestor. Chains of a namespace that can never be
matched again (its model's weights changed) are freed at once by :meth:`retire`, before eviction
has to take any live block.

LRU order is one ``OrderedDict``, front = least recently used, kept so that every block stands
before its parent: a touch moves a chain to the back deepest-first. The front block is therefore
always a leaf (or pinned), and eviction is O(1) amortised.

Writing a block is two-phase: :meth:`reserve` hands out free ids (evicting if needed),
the caller writes K/V into them, then :meth:`publish` makes them visible, or :meth:`abort`
returns them. A failure between the two never leaves a half-written block that a lookup can see.

A published block may carry a *checkpoint*: a slot of state that holds at the end of the block
(``num_checkpoints`` slots in all). Checkpoints have their own LRU order: when slots run out, the
least recently used checkpoint of an unpinned block is dropped (the block stays). Evicting a block
frees its checkpoint. Writing one is two-phase too: :meth:`reserve_checkpoint`, write,
:meth:`attach_checkpoint` (or :meth:`release_checkpoint`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .hashing import Chain

__all__ = ["Block", "BlockManager", "CommitPlan"]


@dataclass
class Block:
    block_id: int
    key: bytes
    parent: int | None  # parent block id; None for the first block of a chain
    tokens: bytes
    children: int = 0
    pins: int = 0
    checkpoint: int | None = None  # slot of the state at the end of this block, if one is kept


@dataclass
class CommitPlan:
    """Blocks ``chain[first : first + len(block_ids)]`` go into ``block_ids`` (reserved, unpublished)."""

    chain: Chain
    first: int
    block_ids: list[int]
    parent: int | None
    pinned: list[int] = field(default_factory=list)


class BlockManager:
    """Bookkeeping for ``num_blocks`` fixed-size blocks (see module docstring)."""

    def __init__(self, num_blocks: int, num_checkpoints: int = 0):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._by_key: dict[bytes, Block] = {}
        self._blocks: dict[int, Block] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._reserved: set[int] = set()
        self.evicted_blocks = 0
        self.retired_blocks = 0  # freed by retire(): their namespace can never be matched again
        self.published_blocks = 0
        self.num_checkpoints = num_checkpoints
        self.evicted_checkpoints = 0
        self._free_slots: deque[int] = deque(range(num_checkpoints))
        self._checkpointed: OrderedDict[int, None] = OrderedDict()  # block ids, LRU first
        self._reserved_slots: set[int] = set()
        # called with each block about to be evicted, while its data is still in place
        self.on_evict: Callable[[Block], None] | None = None

    # ----------------------------------------------------------------- queries
    @property
    def num_stored(self) -> int:
        return len(self._blocks)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def block(self, block_id: int) -> Block:
        return self._blocks[block_id]

    def blocks(self) -> list[Block]:
        """Published blocks, least recently used first."""
        return [self._blocks[i] for i in self._lru]

    def blocks_parents_first(self) -> list[Block]:
        """Published blocks ordered so that every block comes after its parent."""
        depth: dict[int, int] = {}
        for blk in self._blocks.values():
            path, node = [], blk
            while node.block_id not in depth and node.parent is not None:
                path.append(node)
                node = self._blocks[node.parent]
            d = depth.setdefault(node.block_id, 0)
            for n in reversed(path):
                d += 1
                depth[n.block_id] = d
        return sorted(self._blocks.values(), key=lambda b: depth[b.block_id])

    def _walk(self, chain: Chain) -> list[int]:
        """Ids of the longest published prefix of ``chain``, verified by tokens and parent."""
        ids: list[int] = []
        parent = None
        for key, tokens in chain:
            blk = self._by_key.get(key)
            if blk is None or blk.tokens != tokens or blk.parent != parent:
                break
            ids.append(blk.block_id)
            parent = blk.block_id
        return ids

    def _touch(self, ids: list[int]) -> None:
        """Mark a chain (root first) as just used: deepest to the back first, then its ancestors."""
        if not ids:
            return
        for i in reversed(ids):
            self._lru.move_to_end(i)

    # ----------------------------------------------------------------- lookup
    def match(self, chain: Chain, pin: bool = True) -> list[int]:
        """Ids of the longest published prefix of ``chain``; touched, and pinned if ``pin``.

        Pinned blocks are never evicted; call :meth:`unpin` when their K/V has been read.
        """
        ids = self._walk(chain)
        self._touch(ids)
        if pin:
            self.pin(ids)
        return ids

    def pin(self, ids: list[int]) -> None:
        """Protect published blocks from eviction until :meth:`unpin`."""
        for i in ids:
            self._blocks[i].pins += 1

    def unpin(self, ids: list[int]) -> None:
        for i in ids:
            blk = self._blocks[i]
            if blk.pins <= 0:
                raise RuntimeError(f"block {i} unpinned more often than pinned")
            blk.pins -= 1

    # ----------------------------------------------------------------- commit
    def reserve(self, chain: Chain, data_from: int, limit: int | None = None) -> CommitPlan | None:
        """Reserve free blocks for the part of ``chain`` that is not yet published.

        ``data_from``: the caller holds K/V for ``chain[data_from:]`` only. If a block before
        that is missing (evicted since it was matched), nothing can be committed: returns None.
        Otherwise reserves ids for as many of the missing blocks as space allows (evicting
        least-recently-used leaves) and returns the plan; the parent stays pinned until
        :meth:`publish` or :meth:`abort`. ``limit`` caps the number of blocks reserved.
        """
        present = self._walk(chain)
        self._touch(present)
        first = len(present)
        if first < data_from or first == len(chain):
            return None
        parent = present[-1] if present else None
        pinned = [parent] if parent is not None else []
        self.pin(pinned)
        ids: list[int] = []
        try:
            want = len(chain) - first if limit is None else min(limit, len(chain) - first)
            while len(ids) < want:
                if not self._free and not self._evict_one():
                    break
                bid = self._free.popleft()
                self._reserved.add(bid)
                ids.append(bid)
        except BaseException:
            self._release(ids, pinned)
            raise
        if not ids:
            self._release(ids, pinned)
            return None
        return CommitPlan(chain=chain, first=first, block_ids=ids, parent=parent, pinned=pinned)

    def publish(self, plan: CommitPlan) -> None:
        """Make a plan's blocks visible (most recently used, with their chain)."""
        parent = plan.parent
        for offset, bid in enumerate(plan.block_ids):
            key, tokens = plan.chain[plan.first + offset]
            self._reserved.discard(bid)
            self._insert(bid, key, tokens, parent)
            parent = bid
        self._unpin_present(plan.pinned)
        plan.pinned = []
        self._touch(self._walk(plan.chain))

    def _insert(self, bid: int, key: bytes, tokens: bytes, parent: int | None) -> None:
        """The one place a block becomes visible: indexed by key, last in LRU order, counted."""
        self._blocks[bid] = blk = Block(block_id=bid, key=key, parent=parent, tokens=tokens)
        self._by_key[key] = blk
        self._lru[bid] = None
        if parent is not None:
            self._blocks[parent].children += 1
        self.published_blocks += 1

    def abort(self, plan: CommitPlan) -> None:
        """Return a plan's reserved blocks unpublished."""
        self._release(plan.block_ids, plan.pinned)
        plan.block_ids, plan.pinned = [], []

    def _release(self, ids: list[int], pinned: list[int]) -> None:
        for bid in ids:
            if bid in self._reserved:
                self._reserved.discard(bid)
                self._free.append(bid)
        self._unpin_present(pinned)

    def _unpin_present(self, ids: list[int]) -> None:
        for i in ids:
            if i in self._blocks:
                self._blocks[i].pins -= 1

    # ----------------------------------------------------------------- eviction
    def _evict_one(self) -> bool:
        """Evict the least recently used unpinned leaf; False if every block is pinned or inner."""
        for bid in self._lru:
            blk = self._blocks[bid]
            if blk.pins == 0 and blk.children == 0:
                if self.on_evict is not None:
                    self.on_evict(blk)
                self._remove(blk)
                self.evicted_blocks += 1
                return True
        return False

    def _remove(self, blk: Block) -> None:
        self._drop_checkpoint(blk)
        del self._lru[blk.block_id]
        del self._blocks[blk.block_id]
        if self._by_key.get(blk.key) is blk:
            del self._by_key[blk.key]
        if blk.parent is not None:
            self._blocks[blk.parent].children -= 1
        self._free.append(blk.block_id)

    def retire(self, dead_root: Callable[[Block], bool]) -> int:
        """Free now every unpinned block of the chains whose first block ``dead_root`` accepts (a
        namespace no lookup can match again), without ``on_evict``: nothing is spilled. Children go
        before parents; a pinned block keeps itself and its ancestors. Returns the blocks freed."""
        dead: set[int] = set()
        for bid in reversed(self._lru):  # parents before children
            blk = self._blocks[bid]
            if (blk.parent in dead) if blk.parent is not None else dead_root(blk):
                dead.add(bid)
        freed = 0
        for bid in [b for b in self._lru if b in dead]:  # children before parents
            blk = self._blocks[bid]
            if blk.pins == 0 and blk.children == 0:
                self._remove(blk)
                freed += 1
        self.retired_blocks += freed
        return freed

    def parent_key(self, blk: Block) -> bytes | None:
        """Key of a block's parent (None for the first block of a chain)."""
        return None if blk.parent is None else self._blocks[blk.parent].key

    def restore(self, key: bytes, tokens: bytes, parent: int | None) -> int:
        """Publish one block directly (loading a snapshot, parents first); returns its id."""
        if key in self._by_key:
            return self._by_key[key].block_id
        if parent is not None and parent not in self._blocks:
            raise ValueError(f"parent block {parent} is not stored")
        if not self._free and not self._evict_one():
            raise RuntimeError("no free block to restore into")
        bid = self._free.popleft()
        self._insert(bid, key, tokens, parent)
        # keep every block before its parent in LRU order
        node = parent
        while node is not None:
            self._lru.move_to_end(node)
            node = self._blocks[node].parent
        return bid

    # ----------------------------------------------------------------- checkpoints
    @property
    def num_checkpointed(self) -> int:
        return len(self._checkpointed)

    def has_checkpoint(self, block_id: int) -> bool:
        return self._blocks[block_id].checkpoint is not None

    def checkpoint_of(self, block_id: int) -> int | None:
        """The checkpoint slot of a published block (touched: it is about to be read)."""
        slot = self._blocks[block_id].checkpoint
        if slot is not None:
            self._checkpointed.move_to_end(block_id)
        return slot

    def reserve_checkpoint(self, block_id: int) -> int | None:
        """A slot for the checkpoint of published block ``block_id``, or None (it has one already,
        or every slot belongs to a pinned block)."""
        if self._blocks[block_id].checkpoint is not None:
            return None
        if not self._free_slots:
            for bid in self._checkpointed:
                if self._blocks[bid].pins == 0 and bid != block_id:
                    self._drop_checkpoint(self._blocks[bid])
                    break
            else:
                return None
        slot = self._free_slots.popleft()
        self._reserved_slots.add(slot)
        return slot

    def attach_checkpoint(self, block_id: int, slot: int) -> None:
        """Make a written slot the checkpoint of ``block_id`` (released instead if the block is gone)."""
        self._reserved_slots.discard(slot)
        blk = self._blocks.get(block_id)
        if blk is None or blk.checkpoint is not None:
            self._free_slots.append(slot)
            return
        blk.checkpoint = slot
        self._checkpointed[block_id] = None

    def release_checkpoint(self, slot: int) -> None:
        """Return a reserved slot unwritten."""
        if slot in self._reserved_slots:
            self._reserved_slots.discard(slot)
            self._free_slots.append(slot)

    def drop_checkpoint(self, key: bytes) -> None:
        """Drop the checkpoint of the block stored under ``key`` (the block stays)."""
        blk = self._by_key.get(key)
        if blk is not None and blk.pins == 0:
            self._drop_checkpoint(blk)

    def _drop_checkpoint(self, blk: Block) -> None:
        if blk.checkpoint is not None:
            self._free_slots.append(blk.checkpoint)
            del self._checkpointed[blk.block_id]
            blk.checkpoint = None
            self.evicted_checkpoints += 1

    def clear(self) -> None:
        """Forget every published block (reserved blocks stay reserved)."""
        if any(b.pins for b in self._blocks.values()):
            raise RuntimeError("cannot clear the pool while a lookup holds blocks")
        for blk in list(self._blocks.values()):
            self._drop_checkpoint(blk)
            self._free.append(blk.block_id)
        self._blocks.clear()
        self._by_key.clear()
        self._lru.clear()

    def check(self) -> None:
        """Assert the invariants (used by tests)."""
        assert len(self._blocks) + len(self._free) + len(self._reserved) == self.num_blocks
        assert set(self._blocks) == set(self._lru)
        assert not (set(self._free) & set(self._blocks)) and not (self._reserved & set(self._blocks))
        children = dict.fromkeys(self._blocks, 0)
        position = {bid: n for n, bid in enumerate(self._lru)}
        for blk in self._blocks.values():
            assert self._by_key[blk.key] is blk
            if blk.parent is not None:
                assert blk.parent in self._blocks, f"block {blk.block_id} has an evicted parent"
                children[blk.parent] += 1
                assert position[blk.block_id] < position[blk.parent], "LRU order: child after parent"
            assert blk.pins >= 0
        for bid, n in children.items():
            assert self._blocks[bid].children == n
        slots = [b.checkpoint for b in self._blocks.values() if b.checkpoint is not None]
        assert len(slots) == len(set(slots)) == len(self._checkpointed)
        assert len(slots) + len(self._free_slots) + len(self._reserved_slots) == self.num_checkpoints
        assert set(self._checkpointed) == {
            b.block_id for b in self._blocks.values() if b.checkpoint is not None
        }
