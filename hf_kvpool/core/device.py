"""The device tier: bookkeeping and bytes of the blocks that live next to the model.

:class:`DeviceTier` joins the bookkeeping (``block_manager.py``: which block holds which tokens,
which carries a checkpoint) and the storage (``block_store.py``: block and checkpoint tensors),
and does every operation that needs both: gathering a prefix into a batch, writing new blocks,
attaching checkpoints, copying blocks out to and in from the lower tiers, exporting a snapshot.
It takes no lock: :class:`~hf_kvpool.core.pool.KVPool` calls it under its own.

Rows are left-padded: column ``c`` of row ``b`` holds token ``c - pads[b]`` of that row
(:func:`token_column`), which is how a prefix's blocks land at the positions they were computed at.
"""

from __future__ import annotations

import math

import torch

from . import snapshot
from .block_manager import Block, BlockManager
from .block_store import BlockStore, CheckpointStore, GatherPlan, StateSpec, StreamSpec
from .hashing import ROOT, Chain, chain_hash
from .tiers import TierEntry

__all__ = ["DeviceTier", "token_column"]


def token_column(pad: int, token: int) -> int:
    """Column of token ``token`` (0-based, pads excluded) in a row with ``pad`` left-pad columns."""
    return pad + token


class DeviceTier:
    """Blocks of ``block_size`` tokens of the streams ``specs``, checkpoints of the tensors ``states``."""

    def __init__(
        self,
        specs: list[StreamSpec],
        states: list[StateSpec],
        block_size: int,
        num_blocks: int,
        num_slots: int,
        backend: str,
    ):
        self.block_size = block_size
        self.store = BlockStore(specs, block_size, num_blocks, backend)
        self.checkpoints = CheckpointStore(states, num_slots) if states else None
        self.manager = BlockManager(num_blocks, num_slots)

    @property
    def layout(self) -> tuple[list[StreamSpec], list[StateSpec]]:
        return self.store.specs, self.checkpoints.specs if self.checkpoints else []

    @property
    def state_shapes(self) -> list[tuple[list[int], torch.dtype]]:
        return [(list(s.shape), s.dtype) for s in self.checkpoints.specs] if self.checkpoints else []

    # ------------------------------------------------------------------ read
    def usable(self, ids: list[int], checkpointed: bool) -> int:
        """Blocks of a matched chain that can be reused: all, or up to the deepest checkpoint."""
        if not checkpointed:
            return len(ids)
        return max((i + 1 for i, bid in enumerate(ids) if self.manager.has_checkpoint(bid)), default=0)

    def columns(self, matched: list[list[int]], pads: list[int], max_columns: int, checkpointed: bool) -> int:
        """The columns every row can take: ``min_b(pads[b] + matched tokens)``; with checkpoints, the
        largest column where every row has one exactly."""
        bs = self.block_size
        if not checkpointed:
            return min(min(token_column(p, len(ids) * bs) for p, ids in zip(pads, matched)), max_columns)
        common: set[int] | None = None
        for pad, ids in zip(pads, matched):
            ok = {
                token_column(pad, (i + 1) * bs)
                for i, bid in enumerate(ids)
                if self.manager.has_checkpoint(bid)
            }
            common = ok if common is None else common & ok
        return max((c for c in common or () if c <= max_columns), default=0)

    def gather(
        self, matched: list[list[int]], pads: list[int], columns: int, room, checkpointed: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per stream ``[B, H, >= columns, D]`` (pad columns zero) and, with checkpoints, per state
        tensor ``[B, ...]`` at column ``columns``."""
        bs = self.block_size
        plan = GatherPlan()
        for row, (pad, ids) in enumerate(zip(pads, matched)):
            need = columns - pad  # tokens this row takes from the pool
            for j in range(math.ceil(max(need, 0) / bs)):
                plan.add(ids[j], row, token_column(pad, j * bs), min(bs, need - j * bs))
        full = not any(pads)  # no pad column: every column is written
        streams = self.store.gather(plan, len(matched), columns, full=full, room=room)
        if not checkpointed:
            return streams, None
        slots = [
            self.manager.checkpoint_of(ids[(columns - pad) // bs - 1]) for pad, ids in zip(pads, matched)
        ]
        return streams, self.checkpoints.read(slots)

    # ------------------------------------------------------------------ write
    def write(
        self, chain: Chain, data_from: int, streams: list[torch.Tensor], row: int, first_column: int
    ) -> list[int]:
        """Write the blocks of ``chain`` not stored yet (see :meth:`KVPool.commit`); returns their ids."""
        plan = self.manager.reserve(chain, data_from)
        if plan is None:
            return []
        try:
            bs = self.block_size
            cols = [first_column + (plan.first + i) * bs for i in range(len(plan.block_ids))]
            self.store.scatter(streams, plan.block_ids, [row] * len(cols), cols)
        except BaseException:
            self.manager.abort(plan)
            raise
        self.manager.publish(plan)
        return list(plan.block_ids)

    def attach(self, block_id: int, state: list[torch.Tensor]) -> bool:
        """Store ``state`` as the checkpoint of ``block_id``; False if it has one or no slot is free."""
        slot = self.manager.reserve_checkpoint(block_id)
        if slot is None:
            return False
        try:
            self.checkpoints.write(slot, state)
        except BaseException:
            self.manager.release_checkpoint(slot)
            raise
        self.manager.attach_checkpoint(block_id, slot)
        return True

    def retire(self, namespaces) -> int:
        """Free the blocks of every chain in ``namespaces`` (see :meth:`BlockManager.retire`)."""
        namespaces = set(namespaces)

        def dead(blk: Block) -> bool:  # a first block's key is chain_hash(ROOT, namespace, tokens)
            return any(chain_hash(ROOT, ns, blk.tokens) == blk.key for ns in namespaces)

        return self.manager.retire(dead)

    # ------------------------------------------------------------------ lower tiers
    def entry(self, blk: Block, wait: bool = True) -> TierEntry:
        """A host copy of a stored block with its key, parent key, tokens and checkpoint.

        ``wait=False``: the device-to-host copy is queued on the current stream without a host sync;
        the scatter that reuses the block id, and any copy back, run after it on the same stream."""
        payload = self.store.read_block(blk.block_id, pin=True, wait=wait)
        state = None
        if blk.checkpoint is not None:
            state = self.checkpoints.read_slot(blk.checkpoint, pin=True, wait=wait)
        return TierEntry(blk.key, self.manager.parent_key(blk), blk.tokens, payload, state)

    def write_entries(self, chain: Chain, start: int, entries: list[TierEntry]) -> list[int]:
        """Copy lower-tier entries continuing ``chain`` at block ``start`` into device blocks;
        returns their ids, pinned (all or a prefix of them; none if the chain changed meanwhile)."""
        plan = self.manager.reserve(chain, start, limit=len(entries))
        if plan is None or plan.first != start:
            if plan is not None:
                self.manager.abort(plan)
            return []
        try:
            for bid, entry in zip(plan.block_ids, entries):
                self.store.write_block(bid, entry.payload)
        except BaseException:
            self.manager.abort(plan)
            raise
        self.manager.publish(plan)
        for bid, entry in zip(plan.block_ids, entries):
            if entry.checkpoint is not None and self.checkpoints is not None:
                self.attach(bid, entry.checkpoint)
        self.manager.pin(plan.block_ids)
        return list(plan.block_ids)

    # ------------------------------------------------------------------ snapshots
    def export(self, namespaces: dict[bytes, dict]) -> snapshot.Snapshot:
        """Everything stored, parents before children, on the host."""
        blocks = self.manager.blocks_parents_first()
        ids = torch.tensor([b.block_id for b in blocks], dtype=torch.int64)
        with_state = [i for i, b in enumerate(blocks) if b.checkpoint is not None]
        states = self.checkpoints.read([blocks[i].checkpoint for i in with_state]) if with_state else []
        order = {b.block_id: i for i, b in enumerate(blocks)}
        specs, state_specs = self.layout
        return snapshot.Snapshot(
            block_size=self.block_size,
            specs=specs,
            states=state_specs,
            groups=[g.streams for g in self.store.groups],
            namespaces=dict(namespaces),
            keys=[b.key for b in blocks],
            tokens=[b.tokens for b in blocks],
            parents=[-1 if b.parent is None else order[b.parent] for b in blocks],
            data=[g.data.index_select(0, ids.to(g.data.device)).cpu() for g in self.store.groups],
            state_blocks=with_state,
            state_data=[t.cpu() for t in states],
        )

    def load(self, snap: snapshot.Snapshot) -> None:
        """Publish a snapshot's blocks and checkpoints."""
        ids: list[int] = []
        for key, toks, parent in zip(snap.keys, snap.tokens, snap.parents):
            ids.append(self.manager.restore(key, toks, None if parent < 0 else ids[parent]))
        index = torch.tensor(ids, dtype=torch.int64)
        for group, tensor in zip(self.store.groups, snap.data, strict=True):
            group.data.index_copy_(0, index.to(group.data.device), tensor.to(group.data.device))
        for n, i in enumerate(snap.state_blocks):
            self.attach(ids[i], [t[n] for t in snap.state_data])
