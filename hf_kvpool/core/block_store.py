"""Block storage: the tensors that hold pooled state, and the moves in and out of them.

What a block holds is a list of *streams*: per-token tensors ``[batch, heads, seq, dim]`` (a
layer's keys, its values, its sparse-attention indexer keys...; the caller decides what they
mean). Streams of one (device, dtype, heads, dim) form a group that owns one tensor

    data: [num_blocks, n_streams, 1, heads, block_size, dim]

so every stream lives on its layer's own device and dtype (models dispatched with accelerate's
``device_map`` included), streams of different head sizes (MLA's latent and rope keys) coexist,
and one block id indexes every group. The singleton axis is the kernels' "fields per slot".

A *checkpoint* is state that holds at one token boundary and cannot be rebuilt from per-token
streams (a recurrent or convolution state): a fixed list of tensors per row, stored in slots
(:class:`CheckpointStore`) that the bookkeeping attaches to the block ending at that boundary.

What a block *means* is kept by ``block_manager.py``; this module only moves bytes (``paging.py``:
the torch path and the dispatch to the Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import paging

__all__ = ["StreamSpec", "StateSpec", "BlockStore", "CheckpointStore", "GatherPlan"]


@dataclass(frozen=True)
class StreamSpec:
    """One per-token stream: ``[batch, heads, seq, dim]`` of ``dtype`` on ``device``; ``name`` is the
    caller's (e.g. ``"3.keys"``), kept so that a pool (or a snapshot) says what it holds."""

    device: torch.device
    dtype: torch.dtype
    heads: int
    dim: int
    name: str = ""

    @classmethod
    def of(cls, t: torch.Tensor, name: str = "") -> StreamSpec:
        return cls(t.device, t.dtype, int(t.shape[1]), int(t.shape[3]), name)

    @property
    def storage_key(self) -> tuple:
        """Streams with equal keys share one storage tensor."""
        return (self.device, self.dtype, self.heads, self.dim)

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one block of this stream."""
        return self.heads * block_size * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def __str__(self) -> str:
        return f"{self.heads} heads x {self.dim} dims, {self.dtype} on {self.device}"


@dataclass(frozen=True)
class StateSpec:
    """One tensor of a checkpoint: ``shape`` per row, of ``dtype`` on ``device``; ``name`` as for streams."""

    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]
    name: str = ""

    @classmethod
    def of_row(cls, t: torch.Tensor, name: str = "") -> StateSpec:
        """The spec of one row ``t`` (``t[b]`` of a batched state)."""
        return cls(t.device, t.dtype, tuple(int(s) for s in t.shape), name)

    @property
    def nbytes(self) -> int:
        return (
            torch.empty(self.shape, dtype=self.dtype, device="meta").numel()
            * torch.empty((), dtype=self.dtype).element_size()
        )

    def __str__(self) -> str:
        return f"{list(self.shape)} {self.dtype} on {self.device}"


class GatherPlan:
    """The copies of one gather: entry ``i`` puts the first ``ntok[i]`` tokens of block
    ``block_ids[i]`` at row ``rows[i]``, columns ``cols[i] ...`` of the result. Built a row at a
    time (:meth:`add_row`: array operations, not a Python step per block) or an entry at a time."""

    def __init__(self):
        self._parts: list[tuple[np.ndarray, ...]] = []

    def add(self, block_id: int, row: int, col: int, ntok: int) -> None:
        self._parts.append(tuple(np.array([x], dtype=np.int64) for x in (block_id, row, col, ntok)))

    def add_row(self, block_ids, row: int, col: int, tokens: int, block_size: int) -> None:
        """``tokens`` tokens of one row from its blocks ``block_ids`` (in order, enough of them), the
        first at column ``col``: every block full but the last."""
        n = -(-tokens // block_size)
        if n <= 0:
            return
        ids = np.asarray(block_ids[:n], dtype=np.int64)
        offsets = np.arange(n, dtype=np.int64) * block_size
        ntok = np.full(n, block_size, dtype=np.int64)
        ntok[-1] = tokens - offsets[-1]
        self._parts.append((ids, np.full(n, row, dtype=np.int64), col + offsets, ntok))

    def _column(self, k: int) -> np.ndarray:
        if len(self._parts) != 1:  # merge the parts once
            merged = (
                tuple(np.concatenate([p[j] for p in self._parts]) for j in range(4)) if self._parts else None
            )
            self._parts = [merged] if merged is not None else []
        return self._parts[0][k] if self._parts else np.zeros(0, dtype=np.int64)

    @property
    def block_ids(self) -> list[int]:
        return self._column(0).tolist()

    @property
    def rows(self) -> list[int]:
        return self._column(1).tolist()

    @property
    def cols(self) -> list[int]:
        return self._column(2).tolist()

    @property
    def ntok(self) -> list[int]:
        return self._column(3).tolist()

    def index(self, device: torch.device) -> list[torch.Tensor]:
        """The four int64 index tensors the copy functions take."""
        return [torch.from_numpy(self._column(k)).to(device) for k in range(4)]


@dataclass
class _Group:
    spec: StreamSpec
    streams: list[int]  # indices into the store's stream list
    data: torch.Tensor  # [num_blocks, len(streams), 1, H, bs, D]


class BlockStore:
    """Tensors for ``num_blocks`` blocks of ``block_size`` tokens of the streams ``specs``."""

    def __init__(self, specs: list[StreamSpec], block_size: int, num_blocks: int, backend: str):
        self.specs = list(specs)
        self.num_blocks = num_blocks
        self.backend = backend
        # indices come from the pool's bookkeeping: skip the kernels' range check (a device sync)
        self._trusted = {"validate": False} if backend == "triton" else {}
        by_key: dict[tuple, list[int]] = {}
        for i, spec in enumerate(self.specs):
            by_key.setdefault(spec.storage_key, []).append(i)
        self.groups = []
        for streams in by_key.values():
            spec = self.specs[streams[0]]
            shape = (num_blocks, len(streams), 1, spec.heads, block_size, spec.dim)
            data = torch.empty(shape, dtype=spec.dtype, device=spec.device)
            self.groups.append(_Group(spec, streams, data))

    @staticmethod
    def block_bytes(specs: list[StreamSpec], block_size: int) -> int:
        """Bytes of one block over all streams."""
        return sum(spec.block_bytes(block_size) for spec in specs)

    @property
    def nbytes(self) -> int:
        return sum(g.data.numel() * g.data.element_size() for g in self.groups)

    def gather(
        self, plan: GatherPlan, batch: int, cols: int, full: bool = False, room: list[int] | None = None
    ) -> list[torch.Tensor]:
        """Per stream ``[batch, H, cols, D]``, filled as ``plan`` says; all other columns are zero.
        ``full=True`` promises the plan covers every column (no zero fill). ``room``: per stream,
        columns to allocate (>= ``cols``; a group gets the least of its streams'); the result then
        has that many columns, of which the first ``cols`` are filled."""
        result: list[torch.Tensor] = [None] * len(self.specs)  # type: ignore[list-item]
        for group in self.groups:
            dev = group.data.device
            spec = group.spec
            width = max(cols, min(room[i] for i in group.streams)) if room else cols
            alloc = torch.empty if full else torch.zeros
            # out: [n_streams, 1, B, H, width, D]
            out = alloc(
                (len(group.streams), 1, batch, spec.heads, width, spec.dim), dtype=spec.dtype, device=dev
            )
            paging.gather(self.backend, group.data, *plan.index(dev), out, **self._trusted)
            for i, stream in enumerate(group.streams):
                result[stream] = out[i, 0]
        return result

    def scatter(
        self, streams: list[torch.Tensor], block_ids: list[int], rows: list[int], src_cols: list[int]
    ) -> None:
        """Write full blocks: block ``block_ids[i]`` takes tokens ``src_cols[i] : src_cols[i] + bs`` of
        row ``rows[i]`` of every stream (each ``[B, H, S, D]``)."""
        for group in self.groups:
            dev = group.data.device
            index = [torch.tensor(x, dtype=torch.int64, device=dev) for x in (block_ids, rows, src_cols)]
            srcs = [(streams[i],) for i in group.streams]
            paging.scatter(self.backend, group.data, srcs, *index, **self._trusted)

    @property
    def block_shapes(self) -> list[tuple[list[int], torch.dtype]]:
        """Shape and dtype of one block in each group: ``[n_streams, 1, H, bs, D]``."""
        return [(list(g.data.shape[1:]), g.data.dtype) for g in self.groups]

    def read_block(self, block_id: int, pin: bool = False, wait: bool = True) -> list[torch.Tensor]:
        """A host copy of one block (every group), in pinned memory when ``pin`` and on CUDA.

        ``wait=False`` (pinned only) queues the copy on the current stream without a host sync: later
        work on that stream (a scatter reusing the block id, a copy back) is ordered after it, but
        the host must not read the bytes before the stream gets there.
        """
        return [_to_host(g.data[block_id], pin, wait) for g in self.groups]

    def write_block(self, block_id: int, payload: list[torch.Tensor]) -> None:
        """Copy one block's data (from :meth:`read_block`, any device) into ``block_id``."""
        for g, src in zip(self.groups, payload, strict=True):
            g.data[block_id].copy_(src, non_blocking=True)


class CheckpointStore:
    """``num_slots`` checkpoints, each one tensor per :class:`StateSpec` (per row)."""

    def __init__(self, specs: list[StateSpec], num_slots: int):
        self.specs = list(specs)
        self.num_slots = num_slots
        self.data = [torch.empty((num_slots, *s.shape), dtype=s.dtype, device=s.device) for s in self.specs]

    @staticmethod
    def slot_bytes(specs: list[StateSpec]) -> int:
        return sum(s.nbytes for s in specs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data)

    def write(self, slot: int, state: list[torch.Tensor]) -> None:
        """Store one row's state (tensors of the specs' shapes) in ``slot``."""
        for dst, src in zip(self.data, state, strict=True):
            dst[slot].copy_(src, non_blocking=True)

    def read(self, slots: list[int]) -> list[torch.Tensor]:
        """Per spec, ``[len(slots), *shape]``: row ``i`` holds slot ``slots[i]`` (new tensors)."""
        return [t[torch.tensor(slots, dtype=torch.int64, device=t.device)] for t in self.data]

    def read_slot(self, slot: int, pin: bool = False, wait: bool = True) -> list[torch.Tensor]:
        """A host copy of one checkpoint (see :meth:`BlockStore.read_block`)."""
        return [_to_host(t[slot], pin, wait) for t in self.data]


def _to_host(src: torch.Tensor, pin: bool, wait: bool) -> torch.Tensor:
    pinned = pin and src.is_cuda
    dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned)
    dst.copy_(src, non_blocking=pinned and not wait)
    return dst
