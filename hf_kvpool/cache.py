"""PooledCache: a DynamicCache whose prefill takes shared prompt prefixes from a KVPool.

The cache itself stays thin: it records what ``update()`` receives (for the pool) and forgets its
per-call state when generate() starts or when beam search / assisted decoding rearranges it. The
prefill interception lives in ``integration.py`` (a forward pre-hook on the model).
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from . import compat
from .layers import AppendLayer

if TYPE_CHECKING:
    from .integration import ModelState
    from .tracking import CallTracker

__all__ = ["PooledCache"]

_warned_unbound = False


class PooledCache(DynamicCache):
    """Drop-in replacement for :class:`transformers.DynamicCache` that reuses K/V across calls.

    Args:
        model: the model this cache serves (a PEFT model too). Given, the model is enabled (:func:`hf_kvpool.enable`)
            and nothing else is needed. Without it, the cache binds to the first enabled model that
            uses it; a model that was never enabled sees a plain ``DynamicCache``.
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
        if model is not None and config is None:
            config = _text_config(model)
        super().__init__(ddp_cache_data, config=config, **dynamic_cache_kwargs)
        self._use_append_layers()
        if salt is not None and not isinstance(salt, (str, bytes)):
            raise TypeError(f"salt must be a str or bytes, got {type(salt).__name__}")
        self._salt = salt
        self._pool = pool
        self._state: ModelState | None = None
        self._tracker: CallTracker | None = None
        self._armed = False
        self.reused_tokens: list[int] = []
        if model is not None:
            from .integration import enable, model_state

            enable(model, pool=None)
            self._bind(model_state(model))

    # ---------------------------------------------------------------- binding
    @property
    def model(self) -> torch.nn.Module | None:
        """The model this cache is bound to (None until first used by an enabled model)."""
        return self._state.model if self._state is not None else None

    @property
    def pool(self):
        """The pool this cache reads and fills (None while unbound)."""
        if self._pool is not None:
            return self._pool
        return self._state.pool if self._state is not None else None

    @property
    def salt(self) -> str | bytes | None:
        return self._salt

    def _bind(self, state: ModelState) -> None:
        if self._state is not None and self._state is not state:
            other = self._state.model
            raise ValueError(
                f"this PooledCache is bound to another model ({type(other).__name__} at {id(other):#x}); "
                "create one PooledCache per model: PooledCache(model)"
            )
        if self._state is None and self.get_seq_length() == 0:
            # Lay out the layers as generate() would for this model (sliding-window layers...).
            DynamicCache.__init__(self, config=_text_config(state.model))
            self._use_append_layers()
        self._state = state

    def _use_append_layers(self) -> None:
        """Full-attention layers append in place (``layers.py``); sliding and other layers stay."""
        if self.layer_class_to_replicate is DynamicLayer:
            self.layer_class_to_replicate = AppendLayer
        self.layers = [
            AppendLayer() if type(layer) is DynamicLayer and not layer.is_initialized else layer
            for layer in self.layers
        ]

    # ---------------------------------------------------------------- generate() hooks
    @property
    def _is_user_defined(self) -> bool:
        return True

    @_is_user_defined.setter
    def _is_user_defined(self, value: bool) -> None:
        # generate() sets this on a cache passed by the caller, once per call, before the prefill:
        # a new generation starts, so whatever the cache holds from an earlier call is dropped (the
        # pool has it) and the next forward is a prefill that may take prefixes from the pool.
        self._reset_call()
        if self._state is not None:
            DynamicCache.reset(self)
        self._armed = True

    def _reset_call(self) -> None:
        self._tracker = None
        self._armed = False

    # ---------------------------------------------------------------- Cache API
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        tracker = self._tracker
        if tracker is not None:
            tracker.record(layer_idx, key_states, value_states)
        elif self._state is None:
            _warn_unbound()
        elif self._armed:
            # generate() started with this cache, but the bound model's hook never saw the prefill:
            # another model is running it.
            self._armed = False
            raise ValueError(
                f"this PooledCache is bound to another model ({type(self._state.model).__name__} at "
                f"{id(self._state.model):#x}); create one PooledCache per model: PooledCache(model)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self):
        self._reset_call()
        super().reset()

    # Rearranging rows or dropping tokens ends the commit of generated tokens for this call (the
    # prompt's blocks are already in the pool); the cache keeps working as a DynamicCache.
    def reorder_cache(self, beam_idx):
        self._tracker = None
        super().reorder_cache(beam_idx)

    def crop(self, tokens_to_remove):
        self._tracker = None
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats):
        self._tracker = None
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self._tracker = None
        super().batch_select_indices(indices)

    # ---------------------------------------------------------------- copies
    def __deepcopy__(self, memo):
        """Copies the cached tensors; shares the pool and the model binding (never copies them)."""
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name in ("_state", "_pool"):
                new.__dict__[name] = value
            elif name == "_tracker":
                new.__dict__[name] = None
            else:
                new.__dict__[name] = copy.deepcopy(value, memo)
        return new

    def __getstate__(self):
        """Pickles as an unbound cache: the pool and model are process-local."""
        state = self.__dict__.copy()
        state.update(_state=None, _pool=None, _tracker=None, _armed=False)
        return state


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config(decoder=True)


def _warn_unbound() -> None:
    global _warned_unbound
    if not _warned_unbound:
        _warned_unbound = True
        warnings.warn(
            "PooledCache() is used by a model that was never enabled, so it behaves like DynamicCache "
            "and reuses nothing. Call hf_kvpool.enable(model) once, or pass PooledCache(model).",
            stacklevel=3,
        )
