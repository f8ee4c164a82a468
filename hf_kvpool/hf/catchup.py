"""Batches compute each uncached token once: rows that lack pooled state catch up first.

A batch's prefill takes from the pool only the columns *every* row can take (``C = min over rows``),
so one new row in a batch of cached ones, or the same prompt repeated (``num_return_sequences``,
a GRPO group, beam search's expansion), would compute most of the batch again. Before the batch's
own forward, each distinct row that is behind computes its missing tokens alone (one forward per
distinct row, batch of one, restoring what the pool has for it) and commits them; the batch then
starts from the common column, which is at most one block before its end.

Cost model, in prompt-token positions: without catching up the batch computes ``B * (L - C0)``
positions; raising the common column to ``C1`` costs the missing tokens of the distinct rows below
it plus a forward's fixed cost per forward (``FORWARD_COST_TOKENS``, by device type), after
which the batch computes ``B * (L - C1)``. The cheapest ``C1`` (or none) wins: a forward for three
tokens does not pay. Models with recurrent state can start the batch from a column only where every row has
a checkpoint, i.e. where the rows' padding lines up on block boundaries; elsewhere catching up
buys the batch nothing now (and is skipped), and each row's blocks are still committed by the
batch's own forward.

Whole rows: the pool holds full blocks only, so a batch that starts from a common column makes
every row compute the longest of the rows' partial last blocks. Where every layer keeps all its
tokens (full attention; see ``LayerKind.keeps_tokens``), a plan may instead catch *every* distinct
row up to its last token but one; the batch then takes each row's columns from the pool and, past
what the pool serves, from that row's catch-up cache (``fill``), and computes one column per row.
The cost model weighs it like any other column (``L - 1``).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FORWARD_COST_TOKENS", "WHOLE_ROWS", "fill", "forward_cost", "plan"]

# A forward's fixed cost in prefill-token equivalents, by device type: launching every layer once
# and generate()'s per-call work. On CPUs the work per token dominates (a forward of a small model
# costs about what 10-20 more tokens do, measured here); on GPUs a token costs almost nothing next
# to the launches, so a forward is worth hundreds of tokens.
FORWARD_COST_TOKENS = {"cpu": 16, "cuda": 256}
# Whole rows may be planned (module docstring); False: batches start at a common block boundary
# only, as before them (scripts/bench_rollouts.py measures both side by side).
WHOLE_ROWS = True


def forward_cost(device) -> int:
    return FORWARD_COST_TOKENS.get(getattr(device, "type", str(device)), FORWARD_COST_TOKENS["cuda"])


def plan(
    pool, state, chains, pads, tokens, length: int, max_columns: int, device
) -> tuple[list[tuple[int, int]], bool]:
    """``(row, target)`` for each distinct row that should first hold ``target + 1`` tokens (none
    when catching up does not pay, see module docstring), and whether they are whole rows (every
    distinct row, up to its last token but one: the batch then fills its columns with :func:`fill`)."""
    if len(tokens) < 2 or state.single_steps or (any(pads) and not state.pad_invariant):
        return [], False
    bs = pool.block_size
    have = pool.reusable_tokens(chains, state.checkpointed)
    # the most each row can hold before the batch's forward: its last block boundary before its last token
    target = [max(have[b], (len(t) - 1) // bs * bs) for b, t in enumerate(tokens)]
    if state.checkpointed and len({p % bs for p in pads}) > 1:
        return [], False  # no column where every row has a checkpoint: the batch cannot start later
    batch = len(tokens)
    start = min(min(p + h for p, h in zip(pads, have)), max_columns)
    best, best_cost = [], batch * (length - start)
    for column in sorted({min(p + t, max_columns) for p, t in zip(pads, target)}):
        if column <= start:
            continue
        behind = [b for b in range(batch) if pads[b] + have[b] < column]
        if any(pads[b] + target[b] < column for b in behind):
            continue  # some row cannot reach this column
        jobs = [(b, target[b]) for b in _distinct(tokens, behind)]
        cost = sum(t + 1 - have[b] + forward_cost(device) for b, t in jobs) + batch * (length - column)
        if cost < best_cost:
            best, best_cost = jobs, cost
    if WHOLE_ROWS and state.keeps_tokens and max_columns == length - 1 and min(len(t) for t in tokens) > 1:
        jobs = [(b, len(tokens[b]) - 2) for b in _distinct(tokens, range(batch))]
        cost = sum(max(1, t + 1 - have[b]) + forward_cost(device) for b, t in jobs) + batch
        if cost < best_cost:
            return jobs, True
    return best, False


def _distinct(tokens, rows) -> list[int]:
    """The first of each set of identical rows among ``rows``."""
    first: dict[bytes, int] = {}
    for b in rows:
        first.setdefault(np.asarray(tokens[b]).tobytes(), b)
    return list(first.values())


def fill(
    state, cache, streams: dict[int, dict], columns: int, pads, tokens, scratches: dict, length: int
) -> int:
    """Whole rows: extend every layer's restored ``streams`` (``columns`` columns from the pool) to
    column ``length - 1`` with each row's tokens from the catch-up cache of its distinct row
    (``scratches``: row -> cache holding all its tokens but the last). Returns ``length - 1``."""
    source = {np.asarray(tokens[b]).tobytes(): c for b, c in scratches.items()}
    rows = [source[np.asarray(t).tobytes()] for t in tokens]
    stop = length - 1
    for i, kind in enumerate(state.kinds):
        held = [kind.tokens_of(scratch.layers[i]) for scratch in rows]  # per row: name -> [1, H, n, D]
        for name, first in held[0].items():
            out = streams[i].get(name)
            if out is None or out.shape[2] < stop:
                room = max(stop, kind.room(cache.layers[i], length))
                shape = (len(tokens), first.shape[1], room, first.shape[3])
                grown = torch.zeros(shape, dtype=first.dtype, device=first.device)
                if out is not None:
                    grown[:, :, :columns] = out[:, :, :columns]
                out = streams[i][name] = grown
            for b, row in enumerate(held):
                begin = max(columns, pads[b])  # row b's column c holds its token c - pads[b]
                out[b, :, begin:stop] = row[name][0, :, begin - pads[b] : stop - pads[b]]
    return stop
