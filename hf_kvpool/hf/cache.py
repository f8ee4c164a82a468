"""PooledCache: a DynamicCache whose prefill takes shared prompt prefixes from a KVPool.

The cache stays thin: its layers are DynamicCache's (full-attention layers append in place,
``layers.py``), and everything about the call that uses it (binding to a model, the prefill, the
commits) is its :class:`~hf_kvpool.hf.call.CallState`, driven by the hooks ``enable()`` registers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import compat
from .attach import attach
from .call import CallState
from .kinds import kind_of
from .layers import AppendLayer
from .registry import ModelState

__all__ = ["PooledCache"]


class PooledCache(compat.GenerateStartSignal, DynamicCache):
    """Drop-in replacement for :class:`transformers.DynamicCache` that reuses K/V across calls.

    Args:
        model: the model this cache serves (a PEFT model too). Given, the model is enabled
            (as by :func:`hf_kvpool.enable`, its mode unchanged) and nothing else is needed. Without it, the cache binds to
            the first enabled model that uses it; a model that was never enabled sees a plain
            ``DynamicCache``.
        pool: the :class:`~hf_kvpool.KVPool` to use; default: the model's pool (:func:`hf_kvpool.get_pool`).
        salt: a string (or bytes) that separates tenants: caches with different salts never share a block.
        config: as in ``DynamicCache(config=...)``, when no model is given.

    After a prefill, ``reused_tokens`` lists per row how many prompt tokens came from the pool.

    For compatibility with code that rebuilds a cache from data (DDP, export), a first positional
    argument that is not a model is taken as ``DynamicCache``'s ``ddp_cache_data``.
    """

    def __init__(
        self,
        model: torch.nn.Module | Any = None,
        *,
        pool=None,
        salt: str | bytes | None = None,
        config=None,
        **dynamic_cache_kwargs,
    ):
        ddp_cache_data = None
        if model is not None and not isinstance(model, torch.nn.Module):
            ddp_cache_data, model = model, None
        model = compat.unwrap_model(model)
        if model is not None and compat.refuses_outside_caches(model):
            raise ValueError(
                f"{type(model).__name__} takes no cache but its own in generate() (generate() would raise for "
                "a PooledCache): call model.generate() without cache= for this model"
            )
        if model is not None and config is None:
            config = _text_config(model)
        compat.init_dynamic_cache(self, ddp_cache_data, config, **dynamic_cache_kwargs)
        self._use_append_layers()
        if salt is not None and not isinstance(salt, (str, bytes)):
            raise TypeError(f"salt must be a str or bytes, got {type(salt).__name__}")
        self._salt = salt
        self._pool = pool
        self._call = CallState(on_bind=self._lay_out_for)
        if model is not None:
            self._call.bind(attach(model))

    # ---------------------------------------------------------------- binding
    @property
    def model(self) -> torch.nn.Module | None:
        """The model this cache is bound to (None until first used by an enabled model)."""
        binding = self._call.binding
        return binding.model if binding is not None else None

    @property
    def pool(self):
        """The pool this cache reads and fills (None while unbound)."""
        if self._pool is not None:
            return self._pool
        binding = self._call.binding
        return binding.pool if binding is not None else None

    @property
    def is_compileable(self) -> bool:
        # generate() never compiles for its own DynamicCache: nor for auto mode's cache in its place
        return self._user_defined and DynamicCache.is_compileable.fget(self)

    @property
    def salt(self) -> str | bytes | None:
        return self._salt

    @property
    def reused_tokens(self) -> list[int]:
        """Per row, the prompt tokens the last prefill took from the pool."""
        return self._call.reused_tokens

    def _lay_out_for(self, state: ModelState) -> None:
        """On first meeting its model: lay the layers out as generate() would for it (sliding windows...)."""
        if not compat.holds_tokens(self):
            compat.init_dynamic_cache(self, config=_text_config(state.model))
            self._use_append_layers()

    def _use_append_layers(self) -> None:
        """Each layer as its kind prepares it: full-attention layers append in place (``layers.py``)."""
        if compat.replicated_layer_class(self) is DynamicLayer:
            compat.set_replicated_layer_class(self, AppendLayer)
        self.layers = [
            kind.prepare(layer) if kind else layer
            for layer, kind in zip(self.layers, map(kind_of, self.layers))
        ]

    # ---------------------------------------------------------------- generate() lifecycle
    def _on_generate_start(self) -> None:
        # a new generation: whatever the cache holds from an earlier call is dropped (the pool has
        # it) and the next forward is a prefill that may take prefixes from the pool
        if self._call.binding is not None:
            DynamicCache.reset(self)
        self._call.generate_started()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self._call.on_update(layer_idx, "update", (key_states, value_states))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def update_indexer(self, indexer_key_states, layer_idx, *args, **kwargs):
        self._call.on_update(layer_idx, "update_indexer", (indexer_key_states,))
        return super().update_indexer(indexer_key_states, layer_idx, *args, **kwargs)

    def reset(self):
        self._call.reset()
        super().reset()

    # Rearranging rows or dropping tokens ends the commit of generated tokens for this call (the
    # prompt's blocks are already in the pool); the cache keeps working as a DynamicCache.
    def reorder_cache(self, beam_idx):
        self._call.stop()
        super().reorder_cache(beam_idx)

    def crop(self, tokens_to_remove):
        self._call.stop()
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats):
        self._call.stop()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self._call.stop()
        super().batch_select_indices(indices)

    # ---------------------------------------------------------------- copies
    def __deepcopy__(self, memo):
        """Copies the cached tensors; shares the pool and the model binding (never copies them)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name == "_pool":
                new.__dict__[name] = value
            elif name == "_call":
                call = CallState(on_bind=new._lay_out_for)
                call.binding, call.reused_tokens = value.binding, list(value.reused_tokens)
                new.__dict__[name] = call
            else:
                new.__dict__[name] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self):
        """Pickles as an unbound cache: the pool and model are process-local."""
        state = self.__dict__.copy()
        state.update(_pool=None, _call=None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._call = CallState(on_bind=self._lay_out_for)


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config(decoder=True)
