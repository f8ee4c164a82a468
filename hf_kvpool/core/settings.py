"""A pool's settings: their validation, the backend they resolve to, and how many blocks fit.

Kept apart from ``pool.py`` so that the pool reads as lock, fetch, commit and stats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_store import BlockStore, LayerSpec

__all__ = [
    "BACKENDS",
    "CPU_DEFAULT_CAPACITY_BYTES",
    "CUDA_DEFAULT_FREE_FRACTION",
    "PoolConfigError",
    "PoolSettings",
]

CPU_DEFAULT_CAPACITY_BYTES = 1 << 30  # 1 GiB when the model's K/V lives in host memory
CUDA_DEFAULT_FREE_FRACTION = 0.25  # share of the device's free memory when the pool is allocated
BACKENDS = ("auto", "torch", "triton")


class PoolConfigError(ValueError):
    """The pool cannot serve this model as configured (a user error: raised, never swallowed)."""


@dataclass(frozen=True)
class PoolSettings:
    """Validated arguments of :class:`~hf_kvpool.KVPool` (see its docstring)."""

    block_size: int = 16
    capacity_bytes: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1 or bs > 1024 or bs & (bs - 1):
            raise ValueError(
                f"block_size must be a power of two between 1 and 1024, got {bs!r}; 16 is a good default"
            )
        cap = self.capacity_bytes
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
            raise ValueError(f"capacity_bytes must be a positive int (bytes) or None, got {cap!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backend == "triton" and not 8 <= bs <= 128:
            raise ValueError(f"the triton backend takes block_size 8-128, got {bs}")

    def resolve_backend(self, specs: list[LayerSpec]) -> str:
        """ "torch" or "triton" for storage laid out as ``specs``."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "triton":
            if not _has_triton():
                raise ImportError("KVPool(backend='triton') needs the triton package: pip install triton")
            return "triton"
        on_cuda = any(s.device.type == "cuda" for s in specs)
        return "triton" if on_cuda and 8 <= self.block_size <= 128 and _has_triton() else "torch"

    def num_blocks(self, specs: list[LayerSpec]) -> int:
        """Blocks that fit: ``capacity_bytes`` if given, else a share of each device's memory."""
        per_block = BlockStore.block_bytes(specs, self.block_size)
        if self.capacity_bytes is not None:
            n = self.capacity_bytes // per_block
            if n < 1:
                raise PoolConfigError(
                    f"capacity_bytes={self.capacity_bytes} is smaller than one block: a block of "
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


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
