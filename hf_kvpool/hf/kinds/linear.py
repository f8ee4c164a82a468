"""Linear-attention and state-space layers (gated DeltaNet, KDA, Mamba, short convolutions), alone
or next to attention in one layer.

Their state holds at one token boundary only: per slot, the convolution window (the last inputs
of the causal conv) and the recurrent state (fp32). It cannot be rebuilt from per-token tensors,
so it is pooled as a checkpoint, read after a forward that ends at a block boundary, and put back
through the public ``update_conv_state`` / ``update_recurrent_state`` (which also set the flags the
mixers read: copying tensors in without them makes the model silently start from zero).
"""

from __future__ import annotations

from transformers.cache_utils import (
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionLayer,
)

from .. import compat
from .base import LayerKind, register


def _linear_state(layer) -> dict:
    state = {}
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            state[f"conv{i}"] = layer.conv_states[i]
        if layer.is_recurrent_states_initialized[i]:
            state[f"rec{i}"] = layer.recurrent_states[i]
    return state


def _restore_linear(cache, index: int, state: dict) -> None:
    for name, value in state.items():
        slot = int(name[4:] if name.startswith("conv") else name[3:])
        if name.startswith("conv"):
            cache.update_conv_state(value, index, state_idx=slot, conv_kernel_size=value.shape[-1])
        else:
            cache.update_recurrent_state(value, index, state_idx=slot)


@register
class LinearAttention(LayerKind):
    """``LinearAttentionLayer``: conv and recurrent state only."""

    name = "linear attention / SSM"
    layer_types = (LinearAttentionLayer,)
    checkpointed = True
    attends = False

    def state(self, layer):
        return _linear_state(layer)

    def restore(self, cache, index, streams, columns, state):
        _restore_linear(cache, index, state)


@register
class HybridAttention(LayerKind):
    """A layer with both a linear mixer and attention (Falcon-H1, Zamba, Inkling): K/V per token,
    conv/recurrent state per boundary."""

    name = "linear + attention"
    layer_types = (LinearAttentionAndFullAttentionLayer, LinearAttentionAndSlidingWindowAttentionLayer)
    checkpointed = True

    def record(self, method, args):
        return {"keys": args[0], "values": args[1]} if method == "update" else {}

    def state(self, layer):
        return _linear_state(layer)

    def restore(self, cache, index, streams, columns, state):
        layer = cache.layers[index]
        keys, values = streams["keys"][:, :, :columns], streams["values"][:, :, :columns]
        if isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            compat.restore_sliding_window(layer, keys, values, columns)
        else:
            compat.init_layer(layer, keys, values)
            layer.keys, layer.values = keys, values
        _restore_linear(cache, index, state)
