"""A DynamicLayer that appends in place.

``DynamicLayer.update`` concatenates (``torch.cat``) the whole history with the new columns on
every forward, so each decode step copies the entire K/V of the layer. :class:`AppendLayer` keeps
the same tensors in a buffer with spare room and writes new columns into it; ``keys`` / ``values``
stay views of the filled part, so every reader (masks, ``get_seq_length``, beam search, ``crop``)
sees exactly what a ``DynamicLayer`` would hold. When something replaced ``keys`` by a tensor that
is not a prefix view of the buffer (``reorder_cache``, ``batch_select_indices``, offloading,
``copy.deepcopy``), the next update starts a new buffer from it, as ``torch.cat`` would.

The pool fills a layer's buffer directly (:func:`adopt`), so a prefill that takes ``C`` columns
from the pool copies them once, not twice.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from . import compat

__all__ = ["AppendLayer", "adopt", "spare_columns"]

_MIN_SPARE = 64  # columns of spare room at least, on each (re)allocation


def spare_columns(n: int) -> int:
    """Spare room given to a buffer that must hold ``n`` columns now."""
    return max(_MIN_SPARE, n // 4)


class AppendLayer(DynamicLayer):
    """``DynamicLayer`` with amortised O(new columns) updates (see module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._kbuf: torch.Tensor | None = None  # [B, H, capacity, D]
        self._vbuf: torch.Tensor | None = None

    def _length(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0

    def _is_prefix_view(self, incoming: torch.Tensor, total: int) -> bool:
        """``keys``/``values`` still live at the start of the buffers, with room for ``total`` columns."""
        kb, vb, k, v = self._kbuf, self._vbuf, self.keys, self.values
        if kb is None or k is None or k.dim() != 4:
            return False
        return (
            total <= kb.shape[2]
            and k.data_ptr() == kb.data_ptr()
            and v.data_ptr() == vb.data_ptr()
            and k.shape[:2] == kb.shape[:2] == incoming.shape[:2]
            and k.shape[-1] == kb.shape[-1] == incoming.shape[-1]
            and k.stride() == kb.stride()
            and v.stride() == vb.stride()
            and kb.dtype == incoming.dtype
            and kb.device == incoming.device
        )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            compat.init_layer(self, key_states, value_states)
        n, m = self._length(), key_states.shape[-2]
        if not self._is_prefix_view(key_states, n + m):
            self._regrow(n, n + m + spare_columns(n + m), key_states, value_states)
        self._kbuf[:, :, n : n + m].copy_(key_states)
        self._vbuf[:, :, n : n + m].copy_(value_states)
        self.keys = self._kbuf[:, :, : n + m]
        self.values = self._vbuf[:, :, : n + m]
        return self.keys, self.values

    def _regrow(self, n: int, capacity: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        kbuf = torch.empty((b, h, capacity, d), dtype=key_states.dtype, device=key_states.device)
        vbuf = torch.empty(
            (b, h, capacity, value_states.shape[-1]), dtype=value_states.dtype, device=value_states.device
        )
        if n:
            kbuf[:, :, :n].copy_(self.keys)
            vbuf[:, :, :n].copy_(self.values)
        self._kbuf, self._vbuf = kbuf, vbuf

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


def adopt(layer: AppendLayer, kbuf: torch.Tensor, vbuf: torch.Tensor, filled: int) -> None:
    """Make ``[B, H, capacity, D]`` buffers, whose first ``filled`` columns hold K/V, the layer's."""
    compat.init_layer(layer, kbuf, vbuf)
    layer._kbuf, layer._vbuf = kbuf, vbuf
    layer.keys, layer.values = kbuf[:, :, :filled], vbuf[:, :, :filled]
