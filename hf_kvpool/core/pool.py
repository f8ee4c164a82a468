"""KVPool: a bounded pool of fixed-size K/V blocks keyed by chained prefix hashes.

The pool joins the bookkeeping (``block_manager.py``, which block holds which tokens), the storage
(``block_store.py``, where the bytes are) and the lower tiers (``tiers.py``). It is thread-safe:
matching, gathering and committing run under one lock, so a block being read is never evicted or
overwritten under the reader; lower-tier look-ups and Redis writes run outside it, with the blocks
involved pinned.

Rows are left-padded: column ``c`` of row ``b`` holds token ``c - pads[b]`` of that row
(:func:`token_column`), which is how a prefix's blocks land at the positions they were computed at.

Storage is allocated on the first commit, when the layout of the model's K/V (per-layer device,
dtype, kv_heads, head_dim) is known; a pool serves one layout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import snapshot
from .block_manager import Block, BlockManager
from .block_store import BlockStore, GatherPlan, LayerSpec
from .hashing import Chain
from .settings import PoolConfigError, PoolSettings
from .snapshot import SnapshotError
from .stats import BlockInfo, PoolStats
from .tiers import HostTier, RedisTier, TierEntry, Tiers

__all__ = [
    "KVPool",
    "PoolStats",
    "BlockInfo",
    "Fetched",
    "LayoutMismatchError",
    "PoolConfigError",
    "SnapshotError",
    "register_fingerprint_reader",
    "token_column",
]


# How KVPool.load(model=...) reads a model's fingerprint (hex) without importing transformers:
# the hf_kvpool package registers it (see register_fingerprint_reader).
_fingerprint_reader: Callable[[object], str] | None = None


def register_fingerprint_reader(reader: Callable[[object], str]) -> None:
    global _fingerprint_reader
    _fingerprint_reader = reader


def token_column(pad: int, token: int) -> int:
    """Column of token ``token`` (0-based, pads excluded) in a row with ``pad`` left-pad columns."""
    return pad + token


class LayoutMismatchError(PoolConfigError):
    """A pool filled by one model layout was handed K/V of another."""


@dataclass
class Fetched:
    """Result of :meth:`KVPool.fetch`."""

    columns: int  # C: leading columns of every row filled from the pool
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer [B, H, >= C, D]; None if C == 0


class KVPool:
    """A process-wide pool of K/V blocks.

    Args:
        capacity_bytes: storage size. Default: on CUDA, 25% of the device's free memory when the
            pool is first filled; on CPU 1 GiB (``settings.py``).
        block_size: tokens per block, a power of two in [1, 1024] (the Triton backend takes 8-128).
        backend: "auto" (Triton kernels on CUDA when triton is installed, torch elsewhere), "torch"
            or "triton".
        host_capacity_bytes: size of the host-memory tier that takes blocks evicted from the
            device pool (default 0: evicted blocks are dropped).
        remote: ``"redis://host:port/db"``: a Redis tier shared by every process using that URL.
        remote_timeout: seconds per Redis command; past it (or on an error) the tier is skipped
            for a few seconds and generation goes on without it.
    """

    def __init__(
        self,
        *,
        capacity_bytes: int | None = None,
        block_size: int = 16,
        backend: str = "auto",
        host_capacity_bytes: int = 0,
        remote: str | None = None,
        remote_timeout: float = 0.25,
    ):
        self.settings = PoolSettings(block_size=block_size, capacity_bytes=capacity_bytes, backend=backend)
        self.block_size = block_size
        self._lock = threading.RLock()
        self._store: BlockStore | None = None
        self._manager: BlockManager | None = None
        self._query_tokens = self._hit_tokens = self._lookups = 0
        host = HostTier(host_capacity_bytes) if host_capacity_bytes else None
        remote_tier = RedisTier(remote, timeout=remote_timeout) if remote else None
        self._tiers = Tiers(host, remote_tier) if host is not None or remote_tier is not None else None
        self.namespaces: dict[bytes, dict] = {}  # namespace -> {"model": fingerprint hex, "salt": ...}

    @property
    def backend(self) -> str:
        """The resolved backend ("torch" or "triton"), or the requested one before the first commit."""
        return self._store.backend if self._store is not None else self.settings.backend

    @property
    def specs(self) -> list[LayerSpec] | None:
        """Per-layer K/V layout this pool serves (None before the first commit)."""
        return None if self._store is None else self._store.specs

    def allocate(self, specs: list[LayerSpec]) -> BlockStore:
        """Storage for this layout (allocated on the first call; later calls must match it)."""
        with self._lock:
            if self._store is None:
                num_blocks = self.settings.num_blocks(specs)
                self._store = BlockStore(
                    specs, self.block_size, num_blocks, self.settings.resolve_backend(specs)
                )
                self._manager = BlockManager(num_blocks)
                if self._tiers is not None and self._tiers.host is not None:
                    self._manager.on_evict = lambda blk: self._tiers.spill(self._entry(blk, wait=False))
            elif self._store.specs != specs:
                raise LayoutMismatchError(
                    "this KVPool holds K/V of another layout (per-layer device, dtype, kv heads, head dim): "
                    f"it has {len(self._store.specs)} layers like [{self._store.specs[0]}], the model gives "
                    f"{len(specs)} layers like [{specs[0]}]. Give this model its own pool (also after moving it "
                    "to another dtype or device): hf_kvpool.enable(model, pool=KVPool()) or "
                    "PooledCache(model, pool=KVPool())"
                )
            return self._store

    # ------------------------------------------------------------------ lookup
    def fetch(
        self,
        chains: list[Chain],
        pads: list[int],
        query_tokens: int,
        max_columns: int,
        namespace: bytes = b"",
        room: list[int] | None = None,
    ) -> Fetched:
        """Look up every row's chain and gather the reusable leading columns.

        Row ``b`` is ``pads[b]`` pad columns followed by tokens whose full blocks are ``chains[b]``.
        ``C = min_b(pads[b] + matched_tokens[b])``, capped at ``max_columns``; pad columns are zero.
        ``room``: per layer, columns to allocate for the result (see :meth:`BlockStore.gather`).
        """
        with self._lock:
            self._lookups += 1
            self._query_tokens += query_tokens
            if self._manager is None or max_columns <= 0:
                return Fetched(0, None)
        matched: list[list[int]] = []  # pinned until the end
        try:
            with self._lock:
                for chain in chains:
                    matched.append(self._manager.match(chain))
            if self._tiers is not None:
                for chain, ids in zip(chains, matched):
                    ids.extend(self._promote(chain, len(ids), namespace))
            with self._lock:
                return self._gather(matched, pads, max_columns, room)
        finally:
            with self._lock:
                for ids in matched:
                    self._manager.unpin(ids)

    def _gather(self, matched: list[list[int]], pads: list[int], max_columns: int, room) -> Fetched:
        bs = self.block_size
        columns = min(min(token_column(p, len(ids) * bs) for p, ids in zip(pads, matched)), max_columns)
        if columns <= 0 or all(columns <= p for p in pads):
            return Fetched(0, None)
        plan = GatherPlan()
        for row, (pad, ids) in enumerate(zip(pads, matched)):
            need = columns - pad  # tokens this row takes from the pool
            for j in range(math.ceil(max(need, 0) / bs)):
                plan.add(ids[j], row, token_column(pad, j * bs), min(bs, need - j * bs))
        full = not any(pads)  # no pad column: every column is written
        layer_kv = self._store.gather(plan, len(matched), columns, full=full, room=room)
        self._hit_tokens += sum(max(0, columns - p) for p in pads)
        return Fetched(columns, layer_kv)

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        chain: Chain,
        data_from: int,
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
        row: int,
        first_column: int,
        namespace: bytes = b"",
    ) -> int:
        """Store the blocks of ``chain`` that are not in the pool yet.

        ``layer_kv`` holds per layer ``[B, H, S, D]`` K/V; row ``row`` holds token 0 of the chain at
        column ``first_column`` (may be negative when earlier columns were dropped), so block ``j``
        (for ``j >= data_from``) starts at column ``first_column + j * block_size``. Returns the
        number of blocks written (fewer than asked when the pool is full of pinned blocks).
        """
        store = self.allocate([LayerSpec.of(k) for k, _ in layer_kv])
        bs = self.block_size
        with self._lock:
            plan = self._manager.reserve(chain, data_from)
            if plan is None:
                return 0
            try:
                cols = [first_column + (plan.first + i) * bs for i in range(len(plan.block_ids))]
                store.scatter(layer_kv, plan.block_ids, [row] * len(cols), cols)
            except BaseException:
                self._manager.abort(plan)
                raise
            self._manager.publish(plan)
            remote = self._tiers is not None and self._tiers.remote is not None
            entries = [self._entry(self._manager.block(bid)) for bid in plan.block_ids] if remote else []
        if entries:
            self._tiers.write_through(namespace, entries)  # network I/O, outside the lock
        return len(plan.block_ids)

    # ------------------------------------------------------------------ tiers
    def _entry(self, blk: Block, wait: bool = True) -> TierEntry:
        """A host copy of a stored block with its key, parent key and tokens (under the lock).

        ``wait=False``: the device-to-host copy is queued on the current stream without a host sync;
        the scatter that reuses the block id, and any copy back, run after it on the same stream."""
        payload = self._store.read_block(blk.block_id, pin=True, wait=wait)
        return TierEntry(blk.key, self._manager.parent_key(blk), blk.tokens, payload)

    def _promote(self, chain: Chain, start: int, namespace: bytes) -> list[int]:
        """Continue a device match of ``chain`` (``start`` blocks, pinned) in the lower tiers and copy
        what they hold into device blocks; returns the new blocks' ids, pinned."""
        if start >= len(chain):
            return []
        found = self._tiers.find(chain, start, namespace, self._store.block_shapes)  # outside the lock
        if not found:
            return []
        with self._lock:
            plan = self._manager.reserve(chain, start, limit=len(found))
            if plan is None or plan.first != start:
                if plan is not None:
                    self._manager.abort(plan)
                return []
            try:
                for bid, (entry, _) in zip(plan.block_ids, found):
                    self._store.write_block(bid, entry.payload)
            except BaseException:
                self._manager.abort(plan)
                raise
            self._manager.publish(plan)
            self._tiers.count_hits([tier for _, tier in found[: len(plan.block_ids)]])
            self._manager.pin(plan.block_ids)
            return list(plan.block_ids)

    # ------------------------------------------------------------------ admin
    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def stats(self) -> PoolStats:
        with self._lock:
            m, t = self._manager, self._tiers
            host = t.host if t is not None else None
            remote = t.remote if t is not None else None
            return PoolStats(
                query_tokens=self._query_tokens,
                hit_tokens=self._hit_tokens,
                stored_blocks=m.num_stored if m else 0,
                capacity_blocks=m.num_blocks if m else 0,
                evicted_blocks=m.evicted_blocks if m else 0,
                committed_blocks=m.published_blocks if m else 0,
                lookups=self._lookups,
                block_size=self.block_size,
                capacity_bytes=self._store.nbytes if self._store else 0,
                backend=self.backend,
                host_hit_blocks=t.host_hits if t else 0,
                remote_hit_blocks=t.remote_hits if t else 0,
                host_stored_blocks=len(host) if host is not None else 0,
                remote_errors=remote.errors if remote is not None else 0,
            )

    def blocks(self) -> list[BlockInfo]:
        """What the pool holds, least recently used first (for inspection; copies, not live)."""
        with self._lock:
            if self._manager is None:
                return []
            return [
                BlockInfo(b.block_id, b.parent, b.children, len(b.tokens) // 8, b.key.hex())
                for b in self._manager.blocks()
            ]

    def clear(self) -> None:
        """Drop every stored block and zero the counters (storage stays allocated)."""
        with self._lock:
            if self._manager is not None:
                self._manager.clear()
                self._manager.evicted_blocks = 0
                self._manager.published_blocks = 0
            self._query_tokens = self._hit_tokens = self._lookups = 0
            if self._tiers is not None:
                self._tiers.clear()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"KVPool(block_size={s.block_size}, backend={s.backend!r}, blocks={s.stored_blocks}/{s.capacity_blocks}, "
            f"hit_rate={s.hit_rate:.3f})"
        )

    # ------------------------------------------------------------------ snapshots
    def export_blocks(self) -> tuple[list[Block], list[torch.Tensor]]:
        """Every stored block, parents before children, and per storage group their data
        (``[n, n_layers, 2, H, bs, D]`` on the host)."""
        with self._lock:
            if self._store is None:
                return [], []
            blocks = self._manager.blocks_parents_first()
            ids = torch.tensor([b.block_id for b in blocks], dtype=torch.int64)
            data = [g.data.index_select(0, ids.to(g.data.device)).cpu() for g in self._store.groups]
            return blocks, data

    def import_blocks(
        self, keys: list[bytes], tokens: list[bytes], parents: list[int], data: list[torch.Tensor]
    ) -> None:
        """Publish blocks (parents before children; ``parents[i]`` indexes an earlier entry or is -1)
        with their data per storage group, as :meth:`export_blocks` gives them."""
        with self._lock:
            ids: list[int] = []
            for key, toks, parent in zip(keys, tokens, parents):
                ids.append(self._manager.restore(key, toks, None if parent < 0 else ids[parent]))
            index = torch.tensor(ids, dtype=torch.int64)
            for group, tensor in zip(self._store.groups, data, strict=True):
                group.data.index_copy_(0, index.to(group.data.device), tensor.to(group.data.device))

    def save(self, path) -> int:
        """Write the stored blocks to a safetensors snapshot at ``path`` (atomic); returns blocks saved."""
        with self._lock:
            if self._store is None:
                raise SnapshotError(
                    "this pool holds nothing yet (no generate() has filled it); nothing to save"
                )
            blocks, data = self.export_blocks()
            layout = dict(
                block_size=self.block_size,
                specs=self._store.specs,
                groups=[g.layers for g in self._store.groups],
                namespaces=dict(self.namespaces),
            )
        return snapshot.write(path, blocks, data, **layout)

    @classmethod
    def load(cls, path, *, model=None, device=None, **kwargs) -> KVPool:
        """A new pool holding the blocks saved in ``path``.

        Args:
            model: if given, the snapshot must hold blocks of this model (same fingerprint: class,
                config, weights, adapters), else :class:`SnapshotError`.
            device: put every layer's storage there (default: where it was saved).
            kwargs: passed to :class:`KVPool` (``capacity_bytes``, ``backend``...); a capacity too
                small for every saved block is an error.
        """
        snap = snapshot.read(path, device)
        if model is not None:
            if _fingerprint_reader is None:
                raise RuntimeError("KVPool.load(model=...) needs a fingerprint reader: import hf_kvpool")
            if _fingerprint_reader(model) not in {info["model"] for info in snap.namespaces.values()}:
                raise SnapshotError(
                    f"{path} was saved for another model (or other weights): its blocks would never match "
                    "this model. Load a snapshot made with this model, or start from an empty pool"
                )
        pool = cls(block_size=snap.block_size, **kwargs)
        store = pool.allocate(snap.specs)
        if store.num_blocks < len(snap.keys):
            raise SnapshotError(
                f"{path} holds {len(snap.keys)} blocks but the pool has room for {store.num_blocks}; "
                "pass a larger capacity_bytes"
            )
        if [g.layers for g in store.groups] != snap.groups:
            raise SnapshotError(f"{path}: storage groups differ from this pool's layout")
        pool.import_blocks(snap.keys, snap.tokens, snap.parents, snap.data)
        pool.namespaces.update(snap.namespaces)
        return pool

    def __deepcopy__(self, memo):
        return self  # a pool is shared, never copied

    def __reduce__(self):
        raise TypeError("a KVPool cannot be pickled; use pool.save(path) and KVPool.load(path)")
