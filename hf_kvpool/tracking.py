"""Per-call bookkeeping of a PooledCache: which tokens each row holds and which K/V to commit.

A :class:`CallTracker` lives from a prefill to the end of that generation. The cache's ``update()``
hands it every layer's new K/V (``record``), the forward pre-hook the new token ids
(``add_tokens``, device tensors, no host sync), and the post-hook asks it to commit once a row has
completed a block (``commit_if_due``: one host copy of the pending token ids per commit, hashing,
then one scatter per row). Full-attention and sliding-window layers are treated alike: what
``update()`` receives is the full K/V of the new columns, whatever the layer keeps.

Column ``c`` of row ``b`` holds real token ``c - pads[b]`` (left padding), at position
``c - pads[b]``, which is how a block of a prefix is found again at the same positions.
"""

from __future__ import annotations

import numpy as np
import torch

from .hashing import ROOT, as_token_bytes, chain_hash
from .pool import Chain, KVPool

__all__ = ["CallTracker"]


class CallTracker:
    def __init__(
        self,
        pool: KVPool,
        namespace: bytes,
        num_layers: int,
        pads: list[int],
        tokens: list[np.ndarray],
        chains: list[Chain],
        reused_columns: int,
        total_columns: int,
    ):
        self.pool = pool
        self.namespace = namespace
        self.bs = pool.block_size
        self.pads = pads
        self.tokens = tokens  # per row: real token ids known on the host
        self.chains = chains  # per row: keys of every full block so far
        # per row: first chain index not yet committed; blocks before it came from the pool
        self.pending = [max(0, -(-(reused_columns - p) // self.bs)) for p in pads]
        self.base = reused_columns  # column of the first recorded K/V
        self.columns = total_columns  # columns the cache holds after this forward
        self.layer_chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]
        self.token_chunks: list[torch.Tensor] = []  # [B, n] ids not yet copied to the host
        self.next_due = 0  # commit when self.columns >= next_due (prefill: at once)
        self.committed_blocks = 0

    # ---------------------------------------------------------------- hot path
    def record(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V of the new columns of one layer, ``[B, H, n, D]`` (kept by reference)."""
        self.layer_chunks[layer_idx].append((keys, values))

    def add_tokens(self, input_ids: torch.Tensor) -> None:
        """Token ids ``[B, n]`` fed to a forward after the prefill (stay on the device)."""
        self.token_chunks.append(input_ids)
        self.columns += input_ids.shape[1]

    def commit_if_due(self) -> int:
        if self.columns < self.next_due:
            return 0
        return self._commit()

    # ---------------------------------------------------------------- commit
    def _commit(self) -> int:
        if any(not chunks for chunks in self.layer_chunks):
            # argument: whether some layers did give K/V (then the others never will)
            raise _UnsupportedLayers(any(self.layer_chunks))
        if self.token_chunks:
            new_ids = torch.cat(self.token_chunks, dim=1).cpu().numpy()  # the one host sync
            self.token_chunks = []
            self.tokens = [np.concatenate([t, new_ids[b]]) for b, t in enumerate(self.tokens)]
        bs = self.bs
        for b, chain in enumerate(self.chains):
            full = len(self.tokens[b]) // bs
            parent = chain[-1][0] if chain else ROOT
            for j in range(len(chain), full):
                data = as_token_bytes(self.tokens[b][j * bs : (j + 1) * bs])
                parent = chain_hash(parent, self.namespace, data)
                chain.append((parent, data))
        layer_kv = [
            (torch.cat([k for k, _ in chunks], dim=2), torch.cat([v for _, v in chunks], dim=2))
            if len(chunks) > 1
            else chunks[0]
            for chunks in self.layer_chunks
        ]
        written = 0
        for b, chain in enumerate(self.chains):
            if self.pending[b] >= len(chain):
                continue
            start = self.pads[b] - self.base  # column (in layer_kv) of token 0 of row b
            written += self.pool.commit(
                chain, self.pending[b], layer_kv, b, lambda j, s=start: s + j * bs, self.namespace
            )
            self.pending[b] = len(chain)
        self.committed_blocks += written
        # keep only the columns a later block can still need
        new_base = min(p + n * bs for p, n in zip(self.pads, self.pending))
        cut = new_base - self.base
        # clone: a view would keep the whole prefill K/V alive
        self.layer_chunks = [[(k[:, :, cut:].clone(), v[:, :, cut:].clone())] for k, v in layer_kv]
        self.base = new_base
        self.next_due = min(p + (len(c) + 1) * bs for p, c in zip(self.pads, self.chains))
        return written


class _UnsupportedLayers(Exception):
    """Some layer produced no K/V through ``update()`` (KV sharing, recurrent state...)."""
