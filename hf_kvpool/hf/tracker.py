"""What one call commits: the tokens each row holds, the streams recorded since the last commit,
and the checkpoints taken at block boundaries.

Column ``token_column(pads[b], t)`` of row ``b`` holds token ``t`` of that row at position ``t``.
The cache's ``update()`` (and ``update_indexer()``...) hand the tracker every layer's new per-token
tensors (``record``); the forward pre-hook hands it the new token ids (``add_tokens``: device
tensors, no host sync); after each forward, ``commit_if_due`` commits the blocks rows completed:
one host copy of the pending token ids, hashing, one scatter per row. A row that ends exactly at a
block boundary after a forward also gets a checkpoint of the layers' state there (models with
recurrent state): the last boundary of the prompt, and while decoding the last boundary reached
(each new one replaces this call's previous one, so checkpoints do not pile up).

Streams are named ``"<layer>.<stream>"`` (``"3.keys"``), checkpoint tensors ``"<layer>.<state>"``
(``"0.conv0"``); the pool keeps the names, so any call (or process) maps pooled tensors back.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..core.block_store import StateSpec, StreamSpec
from ..core.hashing import ROOT, Chain, block_hashes
from ..core.pool import KVPool, RowCommit, token_column
from .kinds import LayerKind

__all__ = ["CallTracker", "layer_state", "split_name"]


def split_name(name: str) -> tuple[int, str]:
    layer, _, what = name.partition(".")
    return int(layer), what


def layer_state(cache, kinds: list[LayerKind]) -> dict[str, torch.Tensor] | None:
    """Every checkpointed layer's state now, batched: ``"<layer>.<state>"`` -> ``[B, ...]``; None if
    some layer cannot be checkpointed here."""
    out = {}
    for i, kind in enumerate(kinds):
        if kind.checkpointed:
            state = kind.state(cache.layers[i])
            if state is None:
                return None
            out.update((f"{i}.{name}", t) for name, t in sorted(state.items()))
    return out


class _NotYet(Exception):
    """The pool's layout is not known yet and cannot be set at this boundary."""


class CallTracker:
    def __init__(
        self,
        pool: KVPool,
        namespace: bytes,
        cache,
        kinds: list[LayerKind],
        pads: list[int],
        tokens: list[np.ndarray],
        chains: list[Chain],
        reused_columns: int,
    ):
        self.pool = pool
        self.namespace = namespace
        self._cache = weakref.ref(cache)  # the cache holds this tracker: no cycle (see ``cache``)
        self.kinds = kinds
        self.checkpointed = any(k.checkpointed for k in kinds)
        self.pooled_rows = [p == 0 or all(k.pad_invariant for k in kinds) for p in pads]
        self.bs = pool.block_size
        self.pads = pads
        self.chains = chains  # per row: keys of every full block of the tokens known on the host
        # per row: the known token ids past the chain's last full block (a prompt's are all known)
        self.tails = [t[len(c) * self.bs :] for t, c in zip(tokens, chains)]
        self.anchors = [None] * len(pads)  # per row: where its last commit left its chain (pool.py)
        # per row: first chain index not yet committed; blocks before it came from the pool
        self.pending = [max(0, -(-(reused_columns - p) // self.bs)) for p in pads]
        self.base = reused_columns  # column of the first recorded tensor
        self.columns = reused_columns  # columns the cache holds once the running forward is done
        self.chunks: dict[str, list[torch.Tensor]] = {}
        self.token_chunks: list[torch.Tensor] = []  # [B, n] ids not yet copied to the host
        self.decoding = False  # past the prompt: checkpoints roll
        self.rolling: list[bytes | None] = [None] * len(pads)  # per row: key of the last rolled checkpoint

    @property
    def tokens(self) -> list[np.ndarray]:
        """Per row, the token ids known on the host (its chain's blocks, then the rest): O(context),
        for a call's start or end (``live.py``), never per block."""
        return [
            np.concatenate([np.frombuffer(b"".join(t for _, t in chain), dtype="<i8"), tail])
            for chain, tail in zip(self.chains, self.tails)
        ]

    @property
    def cache(self):
        """The cache this call fills (held weakly, so a dropped cache frees its K/V at once)."""
        return self._cache()

    # ---------------------------------------------------------------- hot path
    def record(self, layer_idx: int, streams: dict[str, torch.Tensor]) -> None:
        """New columns of one layer's streams, each ``[B, H, n, D]`` (kept by reference)."""
        for name, t in streams.items():
            self.chunks.setdefault(f"{layer_idx}.{name}", []).append(t)

    def reach(self, columns: int) -> None:
        """A prefill piece will leave ``columns`` columns in the cache (its tokens are known)."""
        self.columns = columns

    def add_tokens(self, input_ids: torch.Tensor) -> None:
        """Token ids ``[B, n]`` fed to a forward after the prefill (stay on the device)."""
        self.decoding = True
        self.token_chunks.append(input_ids)
        self.columns += input_ids.shape[1]

    def next_due(self) -> int:
        """The column at which the next row completes a block."""
        return min(token_column(p, (n + 1) * self.bs) for p, n in zip(self.pads, self.pending))

    def commit_if_due(self) -> int:
        if self.columns < self.next_due():
            return 0
        try:
            return self._commit()
        except _NotYet:  # the first commit ever needs a checkpoint to size the pool: at the next boundary
            return 0

    # ---------------------------------------------------------------- commit
    def _commit(self) -> int:
        if self.token_chunks:
            new_ids = torch.cat(self.token_chunks, dim=1).cpu().numpy()  # the one host sync
            self.token_chunks = []
            self.tails = [np.concatenate([t, new_ids[b]]) for b, t in enumerate(self.tails)]  # O(new)
        state, names, state_names = self._recorded_layout()
        streams = self._streams(names)
        jobs: list[RowCommit] = []
        for b, chain in enumerate(self.chains):
            held = self.columns - self.pads[b]  # tokens of row b in the cache now
            self._extend(b, held)
            full = held // self.bs
            at_boundary = self.checkpointed and state is not None and held > 0 and held % self.bs == 0
            if not self.pooled_rows[b] or (self.pending[b] >= full and not at_boundary):
                continue
            first = token_column(self.pads[b], 0) - self.base  # column (in the streams) of token 0 of row b
            job = RowCommit(chain, self.pending[b], b, first, end=full, anchor=self.anchors[b])
            if at_boundary:
                job.checkpoint = [state[n][b] for n in state_names]
                if self.decoding:  # rolling: the new checkpoint replaces this call's previous one
                    if self.rolling[b] is not None and self.rolling[b] != chain[full - 1][0]:
                        job.drop_checkpoint = self.rolling[b]
                    self.rolling[b] = chain[full - 1][0]
            jobs.append(job)
            self.pending[b] = max(self.pending[b], full)
        written = self.pool.commit_rows(jobs, streams, self.namespace) if jobs else 0
        for job in jobs:
            self.anchors[job.row] = job.anchor
        self._trim(streams, names)
        return written

    def lay_out_pool(self) -> bool:
        """Allocate the pool's storage for the layout recorded so far (a forward has run); whether
        the pool has a layout now."""
        try:
            self._recorded_layout()
        except _NotYet:
            return False
        return True

    def _recorded_layout(self) -> tuple[dict | None, list[str], list[str]]:
        """The layers' state now (checkpointed models), and the names of the streams and checkpoint
        tensors recorded, with derived streams brought up to date."""
        for i, kind in enumerate(self.kinds):
            if kind.derives:
                for name, t in kind.derived(self.cache.layers[i], self.base, self.columns).items():
                    self.chunks[f"{i}.{name}"] = [t]
        state = layer_state(self.cache, self.kinds) if self.checkpointed else {}
        return state, *self._layout(state)

    def _extend(self, b: int, held: int) -> None:
        """Extend row ``b``'s chain with the full blocks of its first ``held`` tokens it lacks: O(new)."""
        chain = self.chains[b]
        new = held // self.bs - len(chain)
        if new > 0:
            parent = chain[-1][0] if chain else ROOT
            chain.extend(block_hashes(self.tails[b][: new * self.bs], self.bs, self.namespace, parent))
            self.tails[b] = self.tails[b][new * self.bs :]

    def _layout(self, state: dict | None) -> tuple[list[str], list[str]]:
        """Names of the streams and checkpoint tensors recorded, checked against the pool's layout
        (which the first commit ever sets: ``KVPool.allocate`` raises on a mismatch)."""
        names = sorted(self.chunks, key=split_name)
        specs = [StreamSpec.of(self.chunks[n][0], n) for n in names]
        if state is None:  # no checkpoint possible now: the layout is the pool's, or waits for one
            layout = self.pool.layout
            if layout is None:
                raise _NotYet()
            if [s for s in layout[0]] != specs:
                self.pool.allocate(specs, layout[1])  # raises the mismatch
            return names, [s.name for s in layout[1]]
        self.pool.allocate(specs, [StateSpec.of_row(t[0], n) for n, t in state.items()])
        return names, list(state)

    def _streams(self, names: list[str]) -> list[torch.Tensor]:
        return [
            torch.cat(self.chunks[n], dim=2) if len(self.chunks[n]) > 1 else self.chunks[n][0] for n in names
        ]

    def _trim(self, streams: list[torch.Tensor], names: list[str]) -> None:
        """Keep only the columns a later block can still need."""
        new_base = min(token_column(p, n * self.bs) for p, n in zip(self.pads, self.pending))
        cut = new_base - self.base
        # clone: a view would keep the whole prefill's tensors alive
        self.chunks = {n: [t[:, :, cut:].clone()] for n, t in zip(names, streams)}
        self.base = new_base
