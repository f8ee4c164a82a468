"""KVPool: a bounded pool of fixed-size blocks of per-token state, keyed by chained prefix hashes.

The pool is the thread-safe front of the device tier (``device.py``: bookkeeping and bytes) and
the lower tiers (``tiers.py``: host memory, Redis). Matching, gathering and committing run under
one lock, so a block being read is never evicted or overwritten under the reader; lower-tier
look-ups and Redis writes run outside it, with the blocks involved pinned.

Storage is allocated on the first commit, when the layout of the model's state (per-token streams:
device, dtype, heads, head_dim; checkpoint tensors) is known; a pool serves one layout.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import snapshot
from .block_store import StateSpec, StreamSpec
from .device import DeviceTier, token_column
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


class LayoutMismatchError(PoolConfigError):
    """A pool filled by one model layout was handed state of another."""


@dataclass
class Fetched:
    """Result of :meth:`KVPool.fetch`."""

    columns: int  # C: leading columns of every row filled from the pool
    streams: list[torch.Tensor] | None  # per stream [B, H, >= C, D]; None if C == 0
    states: list[torch.Tensor] | None = None  # per checkpoint tensor [B, ...] at column C, if asked


class KVPool:
    """A process-wide pool of K/V blocks.

    Args:
        capacity_bytes: storage size. Default: on CUDA, 25% of the device's free memory when the
            pool is first filled; on CPU 1 GiB (``settings.py``). For models with recurrent or
            convolution state, a quarter of it holds checkpoints of that state.
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
        self._device: DeviceTier | None = None
        self._query_tokens = self._hit_tokens = self._lookups = self._checkpoint_hits = 0
        host = HostTier(host_capacity_bytes) if host_capacity_bytes else None
        remote_tier = RedisTier(remote, timeout=remote_timeout) if remote else None
        self._tiers = Tiers(host, remote_tier) if host is not None or remote_tier is not None else None
        self.namespaces: dict[bytes, dict] = {}  # namespace -> {"model": fingerprint hex, "salt": ...}

    @property
    def backend(self) -> str:
        """The resolved backend ("torch" or "triton"), or the requested one before the first commit."""
        return self._device.store.backend if self._device is not None else self.settings.backend

    @property
    def layout(self) -> tuple[list[StreamSpec], list[StateSpec]] | None:
        """The streams and checkpoint tensors this pool serves (None before the first commit)."""
        return None if self._device is None else self._device.layout

    @property
    def remote(self) -> str | None:
        """The URL of the shared Redis tier this pool reads and writes, or None."""
        remote = self._tiers.remote if self._tiers is not None else None
        return remote.url if remote is not None else None

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def allocate(self, specs: list[StreamSpec], states: list[StateSpec] = ()) -> None:
        """Storage for this layout: per-token ``specs`` and per-checkpoint ``states`` (allocated on
        the first call; later calls must give the same layout)."""
        states = list(states)
        with self._lock:
            if self._device is None:
                num_blocks, num_slots = self.settings.sizes(specs, states)
                backend = self.settings.resolve_backend(specs)
                self._device = DeviceTier(specs, states, self.block_size, num_blocks, num_slots, backend)
                if self._tiers is not None and self._tiers.host is not None:
                    device, tiers = self._device, self._tiers
                    device.manager.on_evict = lambda blk: tiers.spill(device.entry(blk, wait=False))
            elif self._device.layout != (list(specs), states):
                held, held_states = self._device.layout
                raise LayoutMismatchError(
                    "this KVPool holds K/V of another layout (per-stream device, dtype, heads, head dim, "
                    f"checkpoint tensors): it has {len(held)} streams like [{_first(held)}] and "
                    f"{len(held_states)} checkpoint tensors, the model gives {len(specs)} like [{_first(specs)}] "
                    f"and {len(states)}. Give this model its own pool (also after moving it to another dtype "
                    "or device): hf_kvpool.enable(model, pool=KVPool()) or PooledCache(model, pool=KVPool())"
                )

    # ------------------------------------------------------------------ lookup
    def fetch(
        self,
        chains: list[Chain],
        pads: list[int],
        query_tokens: int,
        max_columns: int,
        namespace: bytes = b"",
        room: list[int] | None = None,
        checkpointed: bool = False,
        count: bool = True,
    ) -> Fetched:
        """Look up every row's chain and gather the reusable leading columns.

        Row ``b`` is ``pads[b]`` pad columns followed by tokens whose full blocks are ``chains[b]``.
        ``C = min_b(pads[b] + matched_tokens[b])``, capped at ``max_columns``; pad columns are zero.
        With ``checkpointed``, every row must also have a checkpoint exactly at its token ``C - pads[b]``
        (so ``C`` is the largest column where all rows do), and the result carries those states.
        ``room``: per stream, columns to allocate for the result (see :meth:`BlockStore.gather`).
        ``count=False``: not counted in :meth:`stats` (the library's own look-ups, not a caller's prompt).
        """
        with self._lock:
            if count:
                self._lookups += 1
                self._query_tokens += query_tokens
            if self._device is None or max_columns <= 0:
                return Fetched(0, None)
            manager = self._device.manager
        matched: list[list[int]] = []  # pinned until the end
        try:
            with self._lock:
                for chain in chains:
                    matched.append(manager.match(chain))
            if self._tiers is not None:
                for chain, ids in zip(chains, matched):
                    ids.extend(self._promote(chain, len(ids), namespace))
            with self._lock:
                columns = self._device.columns(matched, pads, max_columns, checkpointed)
                if columns <= 0 or all(columns <= p for p in pads):
                    return Fetched(0, None)
                streams, states = self._device.gather(matched, pads, columns, room, checkpointed)
                if count:
                    self._hit_tokens += sum(max(0, columns - p) for p in pads)
                    self._checkpoint_hits += len(pads) if checkpointed else 0
                return Fetched(columns, streams, states)
        finally:
            with self._lock:
                for ids in matched:
                    manager.unpin(ids)

    def count_hits(self, tokens: int) -> None:
        """Count ``tokens`` more prompt tokens as hits in :meth:`stats`: tokens a caller's prompt took
        without computing them beyond what :meth:`fetch` served (a batch row copied from an identical
        row that was computed just before it, whose blocks the pool may have evicted since)."""
        with self._lock:
            self._hit_tokens += tokens

    def reusable_tokens(self, chains: list[Chain], checkpointed: bool = False) -> list[int]:
        """Per row, how many leading tokens the device pool could serve now (a hint: nothing is pinned)."""
        with self._lock:
            if self._device is None:
                return [0] * len(chains)
            device = self._device
            return [
                device.usable(device.manager.match(c, pin=False), checkpointed) * self.block_size
                for c in chains
            ]

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        chain: Chain,
        data_from: int,
        streams: list[torch.Tensor],
        row: int,
        first_column: int,
        namespace: bytes = b"",
        checkpoint: list[torch.Tensor] | None = None,
    ) -> int:
        """Store the blocks of ``chain`` that are not in the pool yet, and a checkpoint at its end.

        ``streams`` holds per stream ``[B, H, S, D]``; row ``row`` holds token 0 of the chain at
        column ``first_column`` (may be negative when earlier columns were dropped), so block ``j``
        (for ``j >= data_from``) starts at column ``first_column + j * block_size``. ``checkpoint``:
        the state (one tensor per checkpoint spec, this row only) after the chain's last block.
        Allocates storage on first use (with these streams and no checkpoints, unless
        :meth:`allocate` was called). Returns the number of blocks written (fewer than asked when the
        pool is full of pinned blocks).
        """
        if self._device is None:
            self.allocate([StreamSpec.of(t) for t in streams])
        entries: list[TierEntry] = []
        with self._lock:
            device = self._device
            written = device.write(chain, data_from, streams, row, first_column)
            stored = device.manager.match(chain, pin=False) if chain else []
            if (
                checkpoint is not None
                and stored
                and len(stored) == len(chain)
                and device.attach(stored[-1], checkpoint)
            ):
                written_or_updated = [*written, stored[-1]] if stored[-1] not in written else written
            else:
                written_or_updated = written
            if self._tiers is not None and self._tiers.remote is not None:
                entries = [device.entry(device.manager.block(bid)) for bid in written_or_updated]
        if entries:
            self._tiers.write_through(namespace, entries)  # network I/O, outside the lock
        return len(written)

    def drop_checkpoint(self, key: bytes) -> None:
        """Drop the checkpoint of the block stored under ``key`` (the block stays)."""
        with self._lock:
            if self._device is not None:
                self._device.manager.drop_checkpoint(key)

    def _promote(self, chain: Chain, start: int, namespace: bytes) -> list[int]:
        """Continue a device match of ``chain`` (``start`` blocks, pinned) in the lower tiers and copy
        what they hold into device blocks; returns the new blocks' ids, pinned."""
        if start >= len(chain):
            return []
        device = self._device
        found = self._tiers.find(chain, start, namespace, device.store.block_shapes, device.state_shapes)
        if not found:
            return []
        with self._lock:
            ids = device.write_entries(chain, start, [entry for entry, _ in found])
            self._tiers.count_hits([tier for _, tier in found[: len(ids)]])
            return ids

    def retire(self, namespaces) -> int:
        """Free now the device blocks of every chain in ``namespaces``: no lookup can match them again
        (their model's weights changed). Lower tiers keep theirs until they age out. Returns the
        blocks freed."""
        with self._lock:
            for namespace in namespaces:
                self.namespaces.pop(namespace, None)
            return self._device.retire(namespaces) if self._device is not None and namespaces else 0

    # ------------------------------------------------------------------ admin
    def stats(self) -> PoolStats:
        with self._lock:
            m = self._device.manager if self._device else None
            t = self._tiers
            host = t.host if t is not None else None
            remote = t.remote if t is not None else None
            checkpoints = self._device.checkpoints if self._device else None
            return PoolStats(
                query_tokens=self._query_tokens,
                hit_tokens=self._hit_tokens,
                stored_blocks=m.num_stored if m else 0,
                capacity_blocks=m.num_blocks if m else 0,
                evicted_blocks=m.evicted_blocks if m else 0,
                committed_blocks=m.published_blocks if m else 0,
                lookups=self._lookups,
                block_size=self.block_size,
                capacity_bytes=self._device.store.nbytes if self._device else 0,
                backend=self.backend,
                host_hit_blocks=t.host_hits if t else 0,
                remote_hit_blocks=t.remote_hits if t else 0,
                host_stored_blocks=len(host) if host is not None else 0,
                remote_errors=remote.errors if remote is not None else 0,
                stored_checkpoints=m.num_checkpointed if m else 0,
                capacity_checkpoints=m.num_checkpoints if m else 0,
                checkpoint_hits=self._checkpoint_hits,
                checkpoint_bytes=checkpoints.nbytes if checkpoints else 0,
            )

    def blocks(self) -> list[BlockInfo]:
        """What the pool holds, least recently used first (for inspection; copies, not live)."""
        with self._lock:
            if self._device is None:
                return []
            return [
                BlockInfo(b.block_id, b.parent, b.children, len(b.tokens) // 8, b.key.hex())
                for b in self._device.manager.blocks()
            ]

    def clear(self) -> None:
        """Drop every stored block and zero the counters (storage stays allocated)."""
        with self._lock:
            if self._device is not None:
                m = self._device.manager
                m.clear()
                m.evicted_blocks = m.published_blocks = m.evicted_checkpoints = 0
            self._query_tokens = self._hit_tokens = self._lookups = self._checkpoint_hits = 0
            if self._tiers is not None:
                self._tiers.clear()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"KVPool(block_size={s.block_size}, backend={s.backend!r}, blocks={s.stored_blocks}/{s.capacity_blocks}, "
            f"hit_rate={s.hit_rate:.3f})"
        )

    # ------------------------------------------------------------------ snapshots
    def save(self, path) -> int:
        """Write the stored blocks to a safetensors snapshot at ``path`` (atomic); returns blocks saved."""
        with self._lock:
            if self._device is None:
                raise SnapshotError(
                    "this pool holds nothing yet (no generate() has filled it); nothing to save"
                )
            snap = self._device.export(self.namespaces)
        return snapshot.write(path, snap)

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
        pool.allocate(snap.specs, snap.states)
        store = pool._device.store
        if store.num_blocks < len(snap.keys):
            raise SnapshotError(
                f"{path} holds {len(snap.keys)} blocks but the pool has room for {store.num_blocks}; "
                "pass a larger capacity_bytes"
            )
        if [g.streams for g in store.groups] != snap.groups:
            raise SnapshotError(f"{path}: storage groups differ from this pool's layout")
        with pool._lock:
            pool._device.load(snap)
        pool.namespaces.update(snap.namespaces)
        return pool

    def __deepcopy__(self, memo):
        return self  # a pool is shared, never copied

    def __reduce__(self):
        raise TypeError("a KVPool cannot be pickled; use pool.save(path) and KVPool.load(path)")


def _first(specs) -> str:
    return str(specs[0]) if specs else "none"
