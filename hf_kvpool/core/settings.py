"""A pool's settings: their validation, the backend they resolve to, and how many blocks fit.

Kept apart from ``pool.py`` so that the pool reads as lock, fetch, commit and stats.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .block_store import BlockStore, CheckpointStore, StateSpec, StreamSpec

__all__ = [
    "BACKENDS",
    "CPU_DEFAULT_CAPACITY_BYTES",
    "CUDA_DEFAULT_FREE_FRACTION",
    "CHECKPOINT_SHARE",
    "PoolConfigError",
    "PoolSettings",
    "STRICT_ENV",
    "check_strict",
    "strict_mode",
]

CPU_DEFAULT_CAPACITY_BYTES = 1 << 30  # 1 GiB when the model's K/V lives in host memory
CUDA_DEFAULT_FREE_FRACTION = 0.25  # share of the device's free memory when the pool is allocated
CHECKPOINT_SHARE = 0.25  # share of the capacity that holds checkpoints, for models that have them
STATELESS_BLOCKS_PER_SLOT = 64  # blocks (token bookkeeping only) per checkpoint slot when no layer has K/V
BACKENDS = ("auto", "torch", "triton")
STRICT_ENV = "HF_KVPOOL_STRICT"  # "1": failures on the commit and fetch paths raise (KVPool(strict=None))


def check_strict(strict: bool | None) -> bool | None:
    if strict is not None and not isinstance(strict, bool):
        raise ValueError(f"strict must be True, False or None (read {STRICT_ENV}), got {strict!r}")
    return strict


def strict_mode(strict: bool | None) -> bool:
    """A pool's ``strict`` setting, or (None) the environment variable, read now."""
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "").strip().lower() in ("1", "true", "yes")


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

    def resolve_backend(self, specs: list[StreamSpec]) -> str:
        """ "torch" or "triton" for storage laid out as ``specs``."""
        if self.backend == "torch":
            return "torch"
        if self.backend == "triton":
            if not _has_triton():
                raise ImportError("KVPool(backend='triton') needs the triton package: pip install triton")
            return "triton"
        on_cuda = any(s.device.type == "cuda" for s in specs)
        return "triton" if on_cuda and 8 <= self.block_size <= 128 and _has_triton() else "torch"

    def sizes(self, specs: list[StreamSpec], states: list[StateSpec]) -> tuple[int, int]:
        """``(blocks, checkpoint slots)`` that fit: ``capacity_bytes`` if given, else a share of each
        device's memory. Checkpoints (when ``states`` is not empty) get ``CHECKPOINT_SHARE`` of it."""
        per_block = BlockStore.block_bytes(specs, self.block_size)
        per_slot = CheckpointStore.slot_bytes(states)
        if not specs:  # only checkpoints (an all-recurrent model): blocks are bookkeeping alone
            slots = self.sizes([StreamSpec(s.device, s.dtype, 1, 1) for s in states[:1]], states)[1]
            return max(STATELESS_BLOCKS_PER_SLOT * slots, 1024), slots
        share = CHECKPOINT_SHARE if states else 0.0
        if self.capacity_bytes is not None:
            blocks = int(self.capacity_bytes * (1 - share)) // per_block
            slots = int(self.capacity_bytes * share) // per_slot if states else 0
            if blocks < 1:
                raise PoolConfigError(
                    f"capacity_bytes={self.capacity_bytes} is smaller than one block: a block of "
                    f"{self.block_size} tokens takes {per_block} bytes for this model; raise capacity_bytes "
                    "or lower block_size"
                )
            if states and slots < 1:
                raise PoolConfigError(
                    f"capacity_bytes={self.capacity_bytes} has no room for one checkpoint of this model's "
                    f"recurrent state ({per_slot} bytes, {CHECKPOINT_SHARE:.0%} of the capacity holds them); "
                    "raise capacity_bytes"
                )
            return blocks, slots
        budget: dict[torch.device, int] = {}
        for spec in [*specs, *states]:
            if spec.device not in budget:
                if spec.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(spec.device)
                    budget[spec.device] = int(free * CUDA_DEFAULT_FREE_FRACTION)
                else:
                    budget[spec.device] = CPU_DEFAULT_CAPACITY_BYTES
        blocks = min(
            int(budget[d] * (1 - share))
            // sum(s.block_bytes(self.block_size) for s in specs if s.device == d)
            for d in {s.device for s in specs}
        )
        slots = (
            min(
                int(budget[d] * share) // sum(s.nbytes for s in states if s.device == d)
                for d in {s.device for s in states}
            )
            if states
            else 0
        )
        return max(1, blocks), max(1, slots) if states else 0


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
