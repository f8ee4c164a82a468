"""KVPool: a bounded pool of fixed-size K/V blocks keyed by chained prefix hashes.

The pool joins the bookkeeping (``block_manager.py``, which block holds which tokens) and the
storage (``block_store.py``, where the bytes are). It is thread-safe: every lookup+gather and every
commit runs under one lock, so a block being read is never evicted or overwritten under the reader.

Storage is allocated on the first commit, when the layout of the model's K/V (per-layer device,
dtype, kv_heads, head_dim) is known; a pool serves one layout.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .block_manager import Block, BlockManager
from .block_store import BlockStore, LayerSpec
from .tiers import HostTier, RedisTier, TierEntry

__all__ = [
    "KVPool",
    "PoolStats",
    "BlockInfo",
    "PoolConfigError",
    "LayoutMismatchError",
    "CPU_DEFAULT_CAPACITY_BYTES",
    "CUDA_DEFAULT_FREE_FRACTION",
]

CPU_DEFAULT_CAPACITY_BYTES = 1 << 30  # 1 GiB when the model's K/V lives in host memory
CUDA_DEFAULT_FREE_FRACTION = 0.25  # share of the device's free memory when the pool is allocated
_BACKENDS = ("auto", "torch", "triton")

Chain = list[tuple[bytes, bytes]]


class PoolConfigError(ValueError):
    """The pool cannot serve this model as configured (a user error: raised, never swallowed)."""


class LayoutMismatchError(PoolConfigError):
    """A pool filled by one model layout was handed K/V of another."""


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`KVPool` (tokens are prompt tokens, blocks are pool blocks)."""

    query_tokens: int  # prompt tokens looked up
    hit_tokens: int  # prompt tokens served from the pool
    stored_blocks: int  # blocks holding K/V now
    capacity_blocks: int  # blocks the pool can hold (0 until the first commit sizes it)
    evicted_blocks: int  # blocks dropped to make room
    committed_blocks: int  # blocks written since creation (or clear())
    lookups: int  # prefill lookups
    block_size: int
    capacity_bytes: int  # bytes of storage allocated (0 until the first commit)
    backend: str
    host_hit_blocks: int = 0  # blocks served from the host tier
    remote_hit_blocks: int = 0  # blocks served from the Redis tier
    host_stored_blocks: int = 0
    remote_errors: int = 0  # failed or timed-out Redis commands (the tier is skipped meanwhile)

    @property
    def hit_rate(self) -> float:
        """``hit_tokens / query_tokens`` (0.0 before any lookup)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def miss_tokens(self) -> int:
        return self.query_tokens - self.hit_tokens


@dataclass(frozen=True)
class BlockInfo:
    """One stored block, as :meth:`KVPool.blocks` reports it."""

    block_id: int
    parent: int | None  # block id of the previous block of its chain; None for a first block
    children: int  # stored blocks whose parent this is
    num_tokens: int
    key: str  # hex of the chained hash


@dataclass
class Fetched:
    """Result of :meth:`KVPool.fetch`."""

    columns: int  # C: leading columns of every row filled from the pool
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer [B, H, >= C, D]; None if C == 0


class KVPool:
    """A process-wide pool of K/V blocks.

    Args:
        capacity_bytes: storage size. Default: on CUDA, ``CUDA_DEFAULT_FREE_FRACTION`` (25%) of the
            device's free memory when the pool is first filled; on CPU ``CPU_DEFAULT_CAPACITY_BYTES``
            (1 GiB).
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
        if (
            not isinstance(block_size, int)
            or isinstance(block_size, bool)
            or block_size < 1
            or block_size > 1024
            or block_size & (block_size - 1)
        ):
            raise ValueError(
                f"block_size must be a power of two between 1 and 1024, got {block_size!r}; 16 is a good default"
            )
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int) or capacity_bytes < 1):
            raise ValueError(f"capacity_bytes must be a positive int (bytes) or None, got {capacity_bytes!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "triton" and not 8 <= block_size <= 128:
            raise ValueError(f"the triton backend takes block_size 8-128, got {block_size}")
        self.block_size = block_size
        self.requested_backend = backend
        self._capacity_bytes = capacity_bytes
        self._lock = threading.RLock()
        self._store: BlockStore | None = None
        self._manager: BlockManager | None = None
        self._query_tokens = 0
        self._hit_tokens = 0
        self._lookups = 0
        self._host = HostTier(host_capacity_bytes) if host_capacity_bytes else None
        self._remote = RedisTier(remote, timeout=remote_timeout) if remote else None
        self._host_hits = 0
        self._remote_hits = 0
        self.namespaces: dict[bytes, dict] = {}  # namespace -> {"model": fingerprint hex, "salt": ...}

    # ------------------------------------------------------------------ layout
    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def layout(self) -> list[LayerSpec] | None:
        """Per-layer K/V layout this pool serves (None before the first commit)."""
        return None if self._store is None else self._store.specs

    @property
    def backend(self) -> str:
        """The resolved backend ("torch" or "triton"), or "auto" before the first commit."""
        return self._store.backend if self._store is not None else self.requested_backend

    def _resolve_backend(self, specs: list[LayerSpec]) -> str:
        on_cuda = any(s.device.type == "cuda" for s in specs)
        if self.requested_backend == "torch":
            return "torch"
        if self.requested_backend == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as exc:
                raise ImportError(
                    "KVPool(backend='triton') needs the triton package: pip install triton"
                ) from exc
            return "triton"
        if on_cuda and 8 <= self.block_size <= 128:
            try:
                import triton  # noqa: F401
            except ImportError:
                return "torch"
            return "triton"
        return "torch"

    def _num_blocks(self, specs: list[LayerSpec]) -> int:
        per_block = BlockStore.block_bytes(specs, self.block_size)
        if self._capacity_bytes is not None:
            n = self._capacity_bytes // per_block
            if n < 1:
                raise PoolConfigError(
                    f"capacity_bytes={self._capacity_bytes} is smaller than one block: a block of "
                    f"{self.block_size} tokens takes {per_block} bytes for this model; raise capacity_bytes "
                    "or lower block_size"
                )
            return n
        per_device: dict[torch.device, int] = {}
        for spec in specs:
            per_device[spec.device] = per_device.get(spec.device, 0) + spec.block_bytes(self.block_size)
        counts = []
        for device, nbytes in per_device.items():
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * CUDA_DEFAULT_FREE_FRACTION)
            else:
                budget = CPU_DEFAULT_CAPACITY_BYTES
            counts.append(budget // nbytes)
        return max(1, min(counts))

    def _ensure_store(self, specs: list[LayerSpec]) -> BlockStore:
        if self._store is None:
            backend = self._resolve_backend(specs)
            num_blocks = self._num_blocks(specs)
            self._store = BlockStore(specs, self.block_size, num_blocks, backend)
            self._manager = BlockManager(num_blocks)
            if self._host is not None:
                self._manager.on_evict = self._spill
        elif self._store.specs != specs:
            raise LayoutMismatchError(
                "this KVPool holds K/V of another layout (per-layer device, dtype, kv heads, head dim): "
                f"it has {len(self._store.specs)} layers like [{self._store.specs[0]}], the model gives "
                f"{len(specs)} layers like [{specs[0]}]. Give this model its own pool: "
                "hf_kvpool.enable(model, pool=KVPool()) or PooledCache(model, pool=KVPool())"
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
            bs = self.block_size
            matched: list[list[int]] = []
            try:
                for chain in chains:
                    matched.append(self._manager.match(chain))
                if self._host is not None or self._remote is not None:
                    for chain, m in zip(chains, matched):
                        m.extend(self._promote(chain, len(m), namespace))
                columns = min(min(p + len(m) * bs for p, m in zip(pads, matched)), max_columns)
                if columns <= 0 or all(columns <= p for p in pads):
                    return Fetched(0, None)
                ids, rows, dst, ntok = [], [], [], []
                for row, (pad, blocks) in enumerate(zip(pads, matched)):
                    need = columns - pad  # tokens this row takes from the pool
                    for j in range(math.ceil(max(need, 0) / bs)):
                        ids.append(blocks[j])
                        rows.append(row)
                        dst.append(pad + j * bs)
                        ntok.append(min(bs, need - j * bs))
                full = not any(pads)  # no pad column: every column is written
                layer_kv = self._store.gather(
                    ids, rows, dst, ntok, len(chains), columns, full=full, room=room
                )
                self._hit_tokens += sum(max(0, columns - p) for p in pads)
                return Fetched(columns, layer_kv)
            finally:
                for m in matched:
                    self._manager.unpin(m)

    # ------------------------------------------------------------------ commit
    def commit(
        self,
        chain: Chain,
        data_from: int,
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
        row: int,
        column_of_block: Callable[[int], int],
        namespace: bytes = b"",
    ) -> int:
        """Store the blocks of ``chain`` that are not in the pool yet.

        ``layer_kv`` holds per layer ``[B, H, S, D]`` K/V; block ``j`` of ``chain`` (for
        ``j >= data_from``) is columns ``column_of_block(j) ...`` of row ``row``. Returns the number of
        blocks written (fewer than asked when the pool is full of pinned blocks).
        """
        specs = [LayerSpec.of(k) for k, _ in layer_kv]
        with self._lock:
            store = self._ensure_store(specs)
            plan = self._manager.reserve(chain, data_from)
            if plan is None:
                return 0
            try:
                cols = [column_of_block(plan.first + i) for i in range(len(plan.block_ids))]
                store.scatter(layer_kv, plan.block_ids, [row] * len(cols), cols)
            except BaseException:
                self._manager.abort(plan)
                raise
            self._manager.publish(plan)
            if self._remote is not None:
                self._write_through(plan.block_ids, namespace)
            return len(plan.block_ids)

    # ------------------------------------------------------------------ tiers
    def _entry(self, blk: Block, wait: bool = True) -> TierEntry:
        payload = self._store.read_block(blk.block_id, pin=True, wait=wait)
        return TierEntry(blk.key, self._manager.parent_key(blk), blk.tokens, payload)

    def _spill(self, blk: Block) -> None:
        """Eviction callback: keep the block in the host tier (called under the lock).

        The device-to-host copy is queued on the current stream, without a host sync: the scatter
        that reuses the block id, and any copy back, run after it on the same stream."""
        self._host.put(self._entry(blk, wait=False))

    def _write_through(self, block_ids: list[int], namespace: bytes) -> None:
        entries = [self._entry(self._manager.block(bid)) for bid in block_ids]
        self._remote.put_many(namespace, entries)

    def _promote(self, chain: Chain, start: int, namespace: bytes) -> list[int]:
        """Continue a device match in the lower tiers; copy what they hold into device blocks.

        Returns the ids of the promoted blocks, pinned like :meth:`BlockManager.match` pins.
        """
        found: list[tuple[TierEntry, str]] = []
        parent = chain[start - 1][0] if start else None
        j = start
        if self._host is not None:
            while j < len(chain):
                e = self._host.get(chain[j][0])
                if e is None or e.tokens != chain[j][1] or e.parent != parent:
                    break
                found.append((e, "host"))
                parent, j = e.key, j + 1
        if self._remote is not None and j < len(chain):
            keys = [key for key, _ in chain[j:]]
            for e, (key, tokens) in zip(
                self._remote.get_many(namespace, keys, self._store.block_shapes), chain[j:]
            ):
                if e is None or e.tokens != tokens or e.parent != parent:
                    break
                found.append((e, "remote"))
                parent = key
        if not found:
            return []
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
        tiers = [tier for _, tier in found[: len(plan.block_ids)]]
        self._host_hits += tiers.count("host")
        self._remote_hits += tiers.count("remote")
        ids = list(plan.block_ids)
        for bid in ids:
            self._manager.block(bid).pins += 1
        return ids

    # ------------------------------------------------------------------ admin
    def stats(self) -> PoolStats:
        with self._lock:
            m = self._manager
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
                host_hit_blocks=self._host_hits,
                remote_hit_blocks=self._remote_hits,
                host_stored_blocks=len(self._host) if self._host is not None else 0,
                remote_errors=self._remote.errors if self._remote is not None else 0,
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
            self._host_hits = self._remote_hits = 0
            if self._host is not None:
                self._host.clear()

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"KVPool(block_size={s.block_size}, backend={s.backend!r}, blocks={s.stored_blocks}/{s.capacity_blocks}, "
            f"hit_rate={s.hit_rate:.3f})"
        )

    # ------------------------------------------------------------------ snapshots
    def save(self, path) -> int:
        """Write the stored blocks to a safetensors snapshot at ``path`` (atomic); returns blocks saved."""
        from .snapshot import save

        return save(self, path)

    @classmethod
    def load(cls, path, *, model=None, device=None, **kwargs) -> KVPool:
        """A pool holding the blocks of a snapshot; ``model`` checks it was made for that model."""
        from .snapshot import load

        return load(path, model=model, device=device, **kwargs)

    def __deepcopy__(self, memo):
        return self  # a pool is shared, never copied

    def __reduce__(self):
        raise TypeError("a KVPool cannot be pickled; use pool.save(path) and KVPool.load(path)")
