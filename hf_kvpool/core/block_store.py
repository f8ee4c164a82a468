"""Block storage: the tensors that hold pooled K/V, and the moves in and out of them.

Layers are grouped by (device, dtype, kv_heads, head_dim); each group owns one tensor

    data: [num_blocks, n_layers, 2, kv_heads, block_size, head_dim]    (2 = K, V)

so that every layer's storage lives on that layer's own device and dtype (models dispatched with
accelerate's ``device_map`` included) and one block id indexes every group. What a block *means*
is kept by ``block_manager.py``; this module only moves bytes (``paging.py``: the torch path and
the dispatch to the Triton kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import paging

__all__ = ["LayerSpec", "BlockStore", "GatherPlan"]


@dataclass(frozen=True)
class LayerSpec:
    """What one layer's K/V looks like: ``[batch, kv_heads, seq, head_dim]`` of ``dtype`` on ``device``."""

    device: torch.device
    dtype: torch.dtype
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, keys: torch.Tensor) -> LayerSpec:
        return cls(keys.device, keys.dtype, int(keys.shape[1]), int(keys.shape[3]))

    def block_bytes(self, block_size: int) -> int:
        """Bytes of one block of this layer (K and V)."""
        return (
            2 * self.kv_heads * block_size * self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        )

    def __str__(self) -> str:
        return f"{self.kv_heads} kv heads x {self.head_dim} dims, {self.dtype} on {self.device}"


@dataclass
class GatherPlan:
    """The copies of one gather: entry ``i`` puts the first ``ntok[i]`` tokens of block
    ``block_ids[i]`` at row ``rows[i]``, columns ``cols[i] ...`` of the result."""

    block_ids: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    cols: list[int] = field(default_factory=list)
    ntok: list[int] = field(default_factory=list)

    def add(self, block_id: int, row: int, col: int, ntok: int) -> None:
        self.block_ids.append(block_id)
        self.rows.append(row)
        self.cols.append(col)
        self.ntok.append(ntok)

    def index(self, device: torch.device) -> list[torch.Tensor]:
        """The four int64 index tensors the copy functions take."""
        return [
            torch.tensor(x, dtype=torch.int64, device=device)
            for x in (self.block_ids, self.rows, self.cols, self.ntok)
        ]


@dataclass
class _Group:
    spec: LayerSpec
    layers: list[int]
    data: torch.Tensor  # [num_blocks, len(layers), 2, H, bs, D]


class BlockStore:
    """Tensors for ``num_blocks`` blocks of ``block_size`` tokens for layers described by ``specs``."""

    def __init__(self, specs: list[LayerSpec], block_size: int, num_blocks: int, backend: str):
        self.specs = list(specs)
        self.num_blocks = num_blocks
        self.backend = backend
        # indices come from the pool's bookkeeping: skip the kernels' range check (a device sync)
        self._trusted = {"validate": False} if backend == "triton" else {}
        by_spec: dict[LayerSpec, list[int]] = {}
        for layer, spec in enumerate(self.specs):
            by_spec.setdefault(spec, []).append(layer)
        self.groups = [
            _Group(
                spec,
                layers,
                torch.empty(
                    (num_blocks, len(layers), 2, spec.kv_heads, block_size, spec.head_dim),
                    dtype=spec.dtype,
                    device=spec.device,
                ),
            )
            for spec, layers in by_spec.items()
        ]

    @staticmethod
    def block_bytes(specs: list[LayerSpec], block_size: int) -> int:
        """Bytes of one block over all layers."""
        return sum(spec.block_bytes(block_size) for spec in specs)

    @property
    def nbytes(self) -> int:
        return sum(g.data.numel() * g.data.element_size() for g in self.groups)

    def gather(
        self, plan: GatherPlan, batch: int, cols: int, full: bool = False, room: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(k, v)``, each ``[batch, H, cols, D]``, filled as ``plan`` says; all other
        columns are zero. ``full=True`` promises the plan covers every column (no zero fill).
        ``room``: per layer, columns to allocate (>= ``cols``; a group gets the least of its layers');
        the result then has that many columns, of which the first ``cols`` are filled."""
        result: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(self.specs)  # type: ignore[list-item]
        for group in self.groups:
            dev = group.data.device
            spec = group.spec
            # out: [n_layers, 2, B, H, width, D]
            width = max(cols, min(room[i] for i in group.layers)) if room else cols
            alloc = torch.empty if full else torch.zeros
            out = alloc(
                (len(group.layers), 2, batch, spec.kv_heads, width, spec.head_dim),
                dtype=spec.dtype,
                device=dev,
            )
            paging.gather(self.backend, group.data, *plan.index(dev), out, **self._trusted)
            for i, layer in enumerate(group.layers):
                result[layer] = (out[i, 0], out[i, 1])
        return result

    def scatter(
        self,
        layer_kv: list[tuple[torch.Tensor, torch.Tensor]],
        block_ids: list[int],
        rows: list[int],
        src_cols: list[int],
    ) -> None:
        """Write full blocks: block ``block_ids[i]`` takes tokens ``src_cols[i] : src_cols[i] + bs`` of
        row ``rows[i]`` of every layer's ``(k, v)`` (each ``[B, H, S, D]``)."""
        for group in self.groups:
            dev = group.data.device
            index = [torch.tensor(x, dtype=torch.int64, device=dev) for x in (block_ids, rows, src_cols)]
            paging.scatter(
                self.backend, group.data, [layer_kv[i] for i in group.layers], *index, **self._trusted
            )

    @property
    def block_shapes(self) -> list[tuple[list[int], torch.dtype]]:
        """Shape and dtype of one block in each group: ``[n_layers, 2, H, bs, D]``."""
        return [(list(g.data.shape[1:]), g.data.dtype) for g in self.groups]

    def read_block(self, block_id: int, pin: bool = False, wait: bool = True) -> list[torch.Tensor]:
        """A host copy of one block (every group), in pinned memory when ``pin`` and on CUDA.

        ``wait=False`` (pinned only) queues the copy on the current stream without a host sync: later
        work on that stream (a scatter reusing the block id, a copy back) is ordered after it, but
        the host must not read the bytes before the stream gets there.
        """
        out = []
        for g in self.groups:
            src = g.data[block_id]
            pinned = pin and src.is_cuda
            dst = torch.empty(src.shape, dtype=src.dtype, pin_memory=pinned)
            dst.copy_(src, non_blocking=pinned and not wait)
            out.append(dst)
        return out

    def write_block(self, block_id: int, payload: list[torch.Tensor]) -> None:
        """Copy one block's data (from :meth:`read_block`, any device) into ``block_id``."""
        for g, src in zip(self.groups, payload, strict=True):
            g.data[block_id].copy_(src, non_blocking=True)
