"""Checkpoint slots of the pool bookkeeping: which published block carries the state that holds at
its end (see ``block_manager.py``; a mixin of :class:`~hf_kvpool.core.block_manager.BlockManager`,
kept apart so that each module reads at once).

``num_checkpoints`` slots in all, with their own LRU order: when slots run out, the least recently
used checkpoint of an unpinned block is dropped (the block stays). Writing one is two-phase:
:meth:`reserve_checkpoint`, write, :meth:`attach_checkpoint` (or :meth:`release_checkpoint`).
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["CheckpointSlots"]


class CheckpointSlots:
    """The checkpoint half of the bookkeeping (its state is set up by ``BlockManager.__init__``)."""

    _blocks: dict
    _by_key: dict
    num_checkpoints: int
    evicted_checkpoints: int
    _free_slots: deque[int]
    _checkpointed: OrderedDict[int, None]
    _reserved_slots: set[int]

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

    def _drop_checkpoint(self, blk) -> None:
        if blk.checkpoint is not None:
            self._free_slots.append(blk.checkpoint)
            del self._checkpointed[blk.block_id]
            blk.checkpoint = None
            self.evicted_checkpoints += 1
