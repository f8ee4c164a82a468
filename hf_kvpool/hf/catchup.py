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
"""

from __future__ import annotations

import numpy as np

__all__ = ["FORWARD_COST_TOKENS", "forward_cost", "plan"]

# A forward's fixed cost in prefill-token equivalents, by device type: launching every layer once
# and generate()'s per-call work. On CPUs the work per token dominates (a forward of a small model
# costs about what 10-20 more tokens do, measured here); on GPUs a token costs almost nothing next
# to the launches, so a forward is worth hundreds of tokens.
FORWARD_COST_TOKENS = {"cpu": 16, "cuda": 256}


def forward_cost(device) -> int:
    return FORWARD_COST_TOKENS.get(getattr(device, "type", str(device)), FORWARD_COST_TOKENS["cuda"])


def plan(pool, state, chains, pads, tokens, length: int, max_columns: int, device) -> list[tuple[int, int]]:
    """``(row, target)`` for each distinct row that should first hold ``target`` tokens in the pool
    (none when catching up does not pay, see module docstring)."""
    if len(tokens) < 2 or state.single_steps or (any(pads) and not state.pad_invariant):
        return []
    bs = pool.block_size
    have = pool.reusable_tokens(chains, state.checkpointed)
    # the most each row can hold before the batch's forward: its last block boundary before its last token
    target = [max(have[b], (len(t) - 1) // bs * bs) for b, t in enumerate(tokens)]
    if state.checkpointed and len({p % bs for p in pads}) > 1:
        return []  # no column where every row has a checkpoint: the batch cannot start later
    batch = len(tokens)
    start = min(min(p + h for p, h in zip(pads, have)), max_columns)
    best, best_cost = [], batch * (length - start)
    for column in sorted({min(p + t, max_columns) for p, t in zip(pads, target)}):
        if column <= start:
            continue
        behind = [b for b in range(batch) if pads[b] + have[b] < column]
        if any(pads[b] + target[b] < column for b in behind):
            continue  # some row cannot reach this column
        distinct: dict[bytes, int] = {}
        for b in behind:
            distinct.setdefault(np.asarray(tokens[b]).tobytes(), b)
        jobs = [(b, target[b]) for b in distinct.values()]
        cost = sum(t + 1 - have[b] + forward_cost(device) for b, t in jobs) + batch * (length - column)
        if cost < best_cost:
            best, best_cost = jobs, cost
    return best
