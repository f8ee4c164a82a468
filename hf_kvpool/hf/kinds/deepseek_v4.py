"""DeepSeek-V4's compressed attention layers (HCA: heavily compressed; CSA: compressed sparse).

Each holds (LAYER_KINDS.md, "DeepseekV4HCACache / DeepseekV4CSACache"):

- a sliding window of K=V (one tensor: ``values`` is ``keys``): per token, from ``update()``;
- compressed entries per name (``"compressor"``, and ``"indexer"`` for CSA), one per
  ``compress_rate`` tokens, kept for the whole sequence: pooled as a per-token stream that holds
  entry ``e`` at its window's last token ``(e + 1) * rate - 1`` and zeros elsewhere, derived from
  the layer at commit time (the stream costs ``rate`` times the entries' bytes; simple, exact);
- per boundary: the raw projections of the tokens since the last closed window (the compressor's
  buffer, fewer than ``rate`` tokens: checkpointed padded to ``rate - 1``) and, for CSA, the
  first half of the last closed window (``overlap``): a checkpoint.

The compressors count cache columns, so a left-padded row differs from the same row unpadded
(upstream): rows with padding are neither read from nor written to the pool.
"""

from __future__ import annotations

import torch

from .. import compat
from .base import LayerKind, register

_MODULE = "transformers.models.deepseek_v4.modeling_deepseek_v4"


def _names(layer) -> list[str]:
    return sorted(layer.compressed_kv)


@register
class CompressedAttention(LayerKind):
    name = "DeepSeek-V4 compressed attention"
    layer_names = (f"{_MODULE}:DeepseekV4HCACache", f"{_MODULE}:DeepseekV4CSACache")
    checkpointed = True
    derives = True
    pad_invariant = False

    def record(self, method, args):
        return {"keys": args[0]} if method == "update" else {}  # K = V

    def derived(self, layer, start, stop):
        rate, out = layer.compress_rate, {}
        for name in _names(layer):
            entries = layer.compressed_kv[name]  # [B, n, D] or None
            if entries is None:
                continue
            stream = entries.new_zeros((entries.shape[0], 1, stop - start, entries.shape[-1]))
            first, last = (
                -(-(start + 1) // rate) - 1,
                min(stop // rate, entries.shape[1]),
            )  # entries closing in range
            if last > first:
                cols = torch.arange(first, last, device=entries.device) * rate + rate - 1 - start
                stream[:, 0, cols] = entries[:, first:last]
            out[f"comp.{name}"] = stream
        return out

    def state(self, layer):
        if not layer.is_initialized:
            return None
        out = {}
        for name in _names(layer):
            kv, gate = layer.buffer_kv[name], layer.buffer_gate[name]
            if kv is None:
                return None
            pad = layer.compress_rate - 1 - kv.shape[1]
            out[f"buffer_kv.{name}"] = torch.nn.functional.pad(kv, (0, 0, 0, pad))
            out[f"buffer_gate.{name}"] = torch.nn.functional.pad(gate, (0, 0, 0, pad))
            overlap = getattr(layer, "overlap_kv", None)
            if overlap is not None:
                if overlap[name] is None:
                    return None  # no window closed yet: nothing to restore it from
                out[f"overlap_kv.{name}"] = overlap[name]
                out[f"overlap_gate.{name}"] = layer.overlap_gate[name]
        return out

    def restore(self, cache, index, streams, columns, state):
        layer = cache.layers[index]
        keys = streams["keys"][:, :, :columns]
        compat.restore_sliding_window(layer, keys, keys, columns)
        layer.values = layer.keys
        rate = layer.compress_rate
        count, held = columns // rate, columns % rate
        for name in _names(layer):
            comp = streams[f"comp.{name}"][:, 0, rate - 1 : count * rate : rate]  # [B, count, D]
            layer.compressed_kv[name] = comp.contiguous()
            layer.entry_count[name] = count
            layer.buffer_kv[name] = state[f"buffer_kv.{name}"][:, :held].clone()
            layer.buffer_gate[name] = state[f"buffer_gate.{name}"][:, :held].clone()
            if f"overlap_kv.{name}" in state:
                layer.overlap_kv[name] = state[f"overlap_kv.{name}"].clone()
                layer.overlap_gate[name] = state[f"overlap_gate.{name}"].clone()
