"""Continuing from what a reused PooledCache already holds, instead of gathering it from the pool.

A PooledCache passed to generate() again (an agent loop, a chat session: ``generate(history,
cache=cache)`` turn after turn) holds, from its last call, the whole prompt and answer contiguous
in its layers' buffers (``layers.AppendLayer``). When generate() starts, the cache keeps a
:class:`Live` record of them (:func:`keep`) before it is emptied; if the prefill's prompt starts
with the tokens held (in the same namespace: model fingerprint and salt), the layers take those
buffers back (:func:`restore`) and only the rest is computed: no byte is copied out of the pool.
Columns past the common prefix are overwritten, exactly as a fresh prefill would write them.

Only what a DynamicCache would keep is kept: the buffers are the cache's own (nothing is held once
the cache is dropped), and they are never handed to another cache. Taken only for one row without
padding, on models whose every layer is full attention (``AppendLayer``) or holds nothing, and
only from a cache whose last call was tracked to its end (a rearranged or cropped cache is not).
The pool still gets every block: blocks it lacks (evicted since) are committed from the buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DummyLayer

from .layers import AppendLayer

__all__ = ["Live", "keep", "columns", "restore"]


@dataclass
class Live:
    namespace: bytes
    tokens: np.ndarray  # int64 [n]: the token ids the buffers hold, in order
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (kbuf, vbuf) [1, H, capacity, D]


def keep(call, cache) -> Live | None:
    """What ``cache`` holds after its last call, if a later prefill may continue from it."""
    tracker = call.tracker
    if tracker is None or call.binding is None or len(tracker.pads) != 1 or tracker.pads[0] != 0:
        return None
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    held = None
    for i, layer in enumerate(cache.layers):
        if type(layer) is DummyLayer:
            continue
        if type(layer) is not AppendLayer or layer._kbuf is None or layer.keys is None:
            return None
        k, v, kb, vb = layer.keys, layer.values, layer._kbuf, layer._vbuf
        if k.data_ptr() != kb.data_ptr() or v.data_ptr() != vb.data_ptr() or k.shape[0] != 1:
            return None  # something replaced the layer's tensors: not what the tracker saw
        n = k.shape[2]
        if held is not None and n != held:
            return None
        held = n
        buffers[i] = (kb, vb)
    if not buffers or held != tracker.columns:
        return None
    pending = [c[0].cpu().numpy() for c in tracker.token_chunks]
    tokens = np.concatenate([np.asarray(tracker.tokens[0], dtype=np.int64), *pending])
    if len(tokens) < held:
        return None
    return Live(tracker.namespace, tokens[:held].copy(), buffers)


def columns(live: Live | None, namespace: bytes, tokens: list[np.ndarray], pads, max_columns: int) -> int:
    """Leading columns of the prompt the live buffers hold (0: none, or not applicable)."""
    if live is None or len(tokens) != 1 or pads[0] != 0 or live.namespace != namespace:
        return 0
    prompt = np.asarray(tokens[0], dtype=np.int64)
    n = min(len(live.tokens), len(prompt), max_columns)
    if n <= 0:
        return 0
    differ = np.flatnonzero(live.tokens[:n] != prompt[:n])
    return n if len(differ) == 0 else int(differ[0])


def restore(live: Live, cache, columns: int) -> dict[int, dict[str, torch.Tensor]]:
    """Give each layer its buffers back holding ``columns`` columns; returns the streams (per layer,
    name -> the buffers) for the tracker to commit what the pool lacks."""
    from .layers import adopt

    streams: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(cache.layers))}
    for i, (kb, vb) in live.buffers.items():
        adopt(cache.layers[i], kb, vb, columns)
        streams[i] = {"keys": kb, "values": vb}
    return streams
