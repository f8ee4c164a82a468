"""Attention layers: full (MLA latents included), sliding-window, sparse-attention indexed, and the
KV-sharing consumers that hold nothing.

Their state is per token: what ``update()`` receives (keys and values of any head sizes: MLA
caches a latent and a rope key of different widths) and, for DSA layers, the indexer keys from
``update_indexer()``. A sliding-window layer keeps only its window, but the pool gets every
token's K/V from ``update()``, so a restore can rebuild the window at any length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DummyLayer, DynamicIndexedLayer, DynamicLayer, DynamicSlidingWindowLayer

from .. import compat
from ..layers import AppendLayer, adopt, spare_columns
from .base import LayerKind, register


def _keys_values(method: str, args: tuple) -> dict[str, torch.Tensor]:
    if method == "update":
        return {"keys": args[0], "values": args[1]}
    return {}


def _set(layer, streams: dict[str, torch.Tensor], columns: int) -> None:
    keys, values = streams["keys"][:, :, :columns], streams["values"][:, :, :columns]
    compat.init_layer(layer, keys, values)
    layer.keys, layer.values = keys, values


@register
class FullAttention(LayerKind):
    """``DynamicLayer``; a PooledCache uses :class:`AppendLayer` (appends in place)."""

    name = "full attention"
    layer_types = (DynamicLayer, AppendLayer)
    keeps_tokens = True

    def prepare(self, layer):
        return AppendLayer() if type(layer) is DynamicLayer and not layer.is_initialized else layer

    def record(self, method, args):
        return _keys_values(method, args)

    def room(self, layer, columns):
        return columns + spare_columns(columns) if isinstance(layer, AppendLayer) else 0

    def tokens_of(self, layer):
        return {"keys": layer.keys, "values": layer.values}

    def restore(self, cache, index, streams, columns, state):
        layer = cache.layers[index]
        if isinstance(layer, AppendLayer):
            adopt(layer, streams["keys"], streams["values"], columns)
        else:
            _set(layer, streams, columns)


@register
class SlidingWindow(LayerKind):
    """``DynamicSlidingWindowLayer`` (sliding and chunked attention)."""

    name = "sliding-window attention"
    layer_types = (DynamicSlidingWindowLayer,)

    def record(self, method, args):
        return _keys_values(method, args)

    def restore(self, cache, index, streams, columns, state):
        keys, values = streams["keys"][:, :, :columns], streams["values"][:, :, :columns]
        compat.restore_sliding_window(cache.layers[index], keys, values, columns)


@register
class IndexedAttention(LayerKind):
    """``DynamicIndexedLayer`` (DeepSeek sparse attention): K/V plus the indexer's keys
    ``[B, n, index_head_dim]``, pooled as a one-head stream. Layers that reuse another layer's
    top-k (GLM-5's "shared" layers) never call ``update_indexer`` and pool K/V alone."""

    name = "indexed attention (DSA)"
    layer_types = (DynamicIndexedLayer,)

    def record(self, method, args):
        if method == "update_indexer":
            return {"indexer": args[0].unsqueeze(1)}  # [B, n, D] -> [B, 1, n, D]
        return _keys_values(method, args)

    def restore(self, cache, index, streams, columns, state):
        layer = cache.layers[index]
        _set(layer, streams, columns)
        if "indexer" in streams:
            layer.update_indexer(streams["indexer"][:, 0, :columns])


@register
class SharedKV(LayerKind):
    """``DummyLayer``: a layer that reads another layer's K/V (Gemma-3n) or has no attention
    (Nemotron-H's MLP/MoE blocks). Nothing to pool: restoring the producers restores it."""

    name = "shared-KV / no cache"
    layer_types = (DummyLayer,)
    attends = False
    keeps_tokens = True  # nothing to keep

    def tokens_of(self, layer):
        return {}
