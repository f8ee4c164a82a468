"""What a pool reports: :class:`PoolStats` (counters), :class:`BlockInfo` (one block) and
:class:`Fetched` (what a look-up gathered)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PoolStats", "BlockInfo", "Fetched"]


@dataclass
class Fetched:
    """Result of :meth:`KVPool.fetch`."""

    columns: int  # C: leading columns of every row filled from the pool
    streams: list[torch.Tensor] | None  # per stream [B, H, >= C, D]; None if C == 0
    states: list[torch.Tensor] | None = None  # per checkpoint tensor [B, ...] at column C, if asked


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
    stored_checkpoints: int = 0  # blocks that carry a checkpoint (recurrent/conv state at their end)
    capacity_checkpoints: int = 0  # checkpoint slots (0 for models with attention state only)
    checkpoint_hits: int = 0  # rows restored from a checkpoint
    checkpoint_bytes: int = 0  # bytes of checkpoint storage allocated

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
