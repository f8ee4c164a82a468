"""What a cache-layer kind tells the pool: the plug-in interface, and the registry of kinds.

A :class:`LayerKind` describes one family of transformers cache layers:

- which *streams* it records: per-token tensors ``[B, H, n, D]`` that the model hands the cache
  (``update()``'s keys and values, an indexer's keys...), pooled in blocks;
- whether the layer itself keeps every token's streams (``keeps_tokens``), so a batch can copy a
  row from another cache of the same model;
- which streams it *derives* from its own state at commit time instead (entries a layer keeps
  for the whole sequence anyway, like DeepSeek-V4's compressed entries);
- whether it holds *state* at a token boundary that cannot be rebuilt from per-token tensors
  (recurrent and convolution state): read after a forward that ends at a block boundary and
  pooled as a checkpoint attached to that block;
- how to put pooled streams and state back into an empty layer (``restore``).

Adding a kind is one module in this package: define a subclass and decorate it with
:func:`register`; the package imports every module in it. Layer classes defined in a model's own
modeling module are named (``"module:Class"``) rather than imported, so registering them does not
import the model.
"""

from __future__ import annotations

import torch

__all__ = ["LayerKind", "register", "kind_of", "kinds_of"]

_BY_CLASS: dict[type, LayerKind] = {}
_BY_NAME: dict[str, LayerKind] = {}


class LayerKind:
    """One family of cache layers (subclass per kind; see module docstring)."""

    name: str = "?"
    layer_types: tuple[type, ...] = ()  # the exact layer classes this kind handles
    layer_names: tuple[str, ...] = ()  # or their "module:Class" names (classes of a model's own module)
    checkpointed = False  # holds state at a token boundary (then ``state``/``restore`` use it)
    attends = True  # reads positions (has attention): prefills must bring position_ids
    pad_invariant = (
        True  # a left-padded row holds what the same row unpadded holds (else no pooling with pads)
    )
    derives = False  # has streams built by ``derived`` at commit time
    keeps_tokens = False  # the layer holds every token's streams (``tokens_of``), as recorded

    def prepare(self, layer):
        """The layer a PooledCache uses in place of ``layer`` (an empty one of the same kind)."""
        return layer

    def record(self, method: str, args: tuple) -> dict[str, torch.Tensor]:
        """The streams in a call to ``cache.<method>(*args, layer_idx)``: name -> ``[B, H, n, D]``."""
        return {}

    def tokens_of(self, layer) -> dict[str, torch.Tensor]:
        """Every token's streams as the layer holds them, ``[B, H, n, D]`` (``keeps_tokens`` kinds)."""
        raise NotImplementedError(f"{self.name} layers do not keep every token")

    def derived(self, layer, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Streams for columns ``[start, stop)`` built from the layer's own state (``derives`` kinds)."""
        return {}

    def state(self, layer) -> dict[str, torch.Tensor] | None:
        """The layer's state now, batched: name -> ``[B, ...]`` (checkpointed kinds); None when it
        cannot be checkpointed at this boundary."""
        return {}

    def restore(self, cache, index: int, streams: dict[str, torch.Tensor], columns: int, state: dict) -> None:
        """Put ``columns`` pooled columns (``streams``: name -> ``[B, H, >= columns, D]``) and the
        state at that column (name -> ``[B, ...]``) into the empty layer ``cache.layers[index]``."""

    def room(self, layer, columns: int) -> int:
        """Columns to allocate for this layer's gathered streams (its buffer may take them as is)."""
        return 0


def register(kind_class: type[LayerKind]) -> type[LayerKind]:
    """Class decorator: register one instance of ``kind_class`` for its ``layer_types``."""
    kind = kind_class()
    for layer_type in kind_class.layer_types:
        _BY_CLASS[layer_type] = kind
    for name in kind_class.layer_names:
        _BY_NAME[name] = kind
    return kind_class


def kind_of(layer) -> LayerKind | None:
    """The kind that handles ``layer`` (by exact class), or None."""
    cls = type(layer)
    return _BY_CLASS.get(cls) or _BY_NAME.get(f"{cls.__module__}:{cls.__qualname__}")


def kinds_of(layers) -> tuple[list[LayerKind], str | None]:
    """The kind of every layer, and if one has none, why the pool cannot serve them."""
    kinds = []
    for i, layer in enumerate(layers):
        kind = kind_of(layer)
        if kind is None:
            return [], f"its cache layer {i} is a {type(layer).__name__}, a kind hf_kvpool cannot pool yet"
        kinds.append(kind)
    return kinds, None
