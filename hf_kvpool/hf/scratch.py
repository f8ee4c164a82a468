"""Forwards the prefill hook runs itself, each on a scratch cache of the caller's kind: laying out
an empty pool's storage before its first look-up, and a batch row's catch-up (``catchup.py``)."""

from __future__ import annotations

import torch

from .registry import ModelState
from .tracker import CallTracker

__all__ = ["catch_up", "lay_out_pool"]


def lay_out_pool(module, cache, state: ModelState, namespace: bytes, token) -> None:
    """A pool that has stored nothing yet has no storage, and a shared tier's blocks need storage of
    the model's layout to land in: learn it from one token run through a scratch cache (once per
    pool; the pool's first commit would otherwise set it, too late for this call's look-up)."""
    scratch = type(cache)(pool=cache.pool, salt=cache.salt)
    call = scratch._call
    call.bind(state)
    call.inner = True  # the hooks leave this forward alone; the tracker records its streams
    call.tracker = CallTracker(
        cache.pool, namespace, scratch, state.kinds, [0], [token[0].cpu().numpy()], [[]], 0
    )
    inputs = dict(input_ids=token, cache=scratch, use_cache=True, logits_to_keep=1)
    if state.attends:
        inputs["position_ids"] = torch.zeros_like(token)
    module(**inputs)
    call.tracker.lay_out_pool()


def catch_up(module, cache, state: ModelState, tokens, device):
    """Put one row's tokens in the pool: a prefill of its own, on a scratch cache of the same kind
    that restores what the pool has and commits the rest; returns that cache."""
    ids = torch.as_tensor(tokens, device=device).unsqueeze(0)
    scratch = type(cache)(pool=cache.pool, salt=cache.salt)
    call = scratch._call
    call.bind(state)
    call.generate_started()
    call.internal = True
    call.auto = cache._call.auto
    inputs = dict(input_ids=ids, cache=scratch, use_cache=True, logits_to_keep=1)
    if state.attends:
        inputs["position_ids"] = torch.arange(ids.shape[1], device=device).unsqueeze(0)
    module(**inputs)
    return scratch
