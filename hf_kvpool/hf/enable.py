"""``enable(model)``: the public entry point. It attaches the model (``attach.py``: state, hooks)
and sets its mode: in auto mode (the default) every ``generate()`` of the model that transformers
would give its default ``DynamicCache`` gets a ``PooledCache`` instead (the seam is
``compat.install_cache_seam``); in explicit mode only a ``PooledCache`` passed by the caller pools.
Also the per-model entry points ``get_pool`` and ``weights_changed``."""

from __future__ import annotations

import torch

from ..core.pool import KVPool
from . import compat
from .attach import attach, model_state
from .cache import PooledCache
from .registry import ModelState, states, states_lock, warn_once

__all__ = ["enable", "get_pool", "model_state", "weights_changed"]

# Kept in a model's __dict__: copies (deepcopy, pickle) of an enabled model are enabled in the same
# mode on their first generate(); a deepcopy shares the pool (a KVPool is shared, never copied).
_MARK = "_hf_kvpool_mode"


class _Mode:
    def __init__(self, auto: bool, pool: KVPool | None = None):
        self.auto, self.pool = auto, pool

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):  # a pool is process-local: an unpickled model gets a new one
        return (_Mode, (self.auto,))


def enable(model: torch.nn.Module, pool: KVPool | None = None, *, auto: bool = True) -> torch.nn.Module:
    """Let ``model`` reuse K/V through a process-wide pool. Idempotent; returns the model enabled.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), or a PEFT model wrapping one (the
            hooks then go on the wrapped model, which ``PeftModel.generate`` runs).
        pool: the pool to serve this model by default; default: a new :class:`KVPool`. Passing a
            different pool to an already enabled model switches its default pool.
        auto: True (default): every ``generate()`` of the model that would use transformers'
            default ``DynamicCache`` uses a ``PooledCache`` instead, so tools that call
            ``generate()`` themselves reuse K/V unchanged. False: only ``generate(cache=PooledCache())``
            pools. Each call sets the mode.
    """
    state = attach(model, pool)
    model = state.model
    with states_lock:
        state.auto = bool(auto)
        model.__dict__[_MARK] = _Mode(state.auto, state.pool)
    if auto:
        problem = compat.install_cache_seam(_auto_cache)
        if problem:
            warn_once(f"auto mode is off: {problem}", "pass cache=PooledCache(model) to generate() instead")
    return model


def get_pool(model: torch.nn.Module) -> KVPool:
    """The pool that serves ``model`` by default (attaches the model if needed)."""
    return attach(model).pool


def weights_changed(model: torch.nn.Module) -> None:
    """Tell hf_kvpool that weights changed in a way version counters miss (writes through ``.data``).

    Optimizer steps, ``load_state_dict`` and in-place ops under ``torch.no_grad`` are seen without it.
    """
    state = states.get(compat.unwrap_model(model))
    if state is not None:
        state.fingerprint.invalidate()


def _auto_cache(model, generation_config, model_kwargs, generation_mode) -> PooledCache | None:
    """The seam's maker: a PooledCache, armed, for a generate() of an auto-mode model that would
    use the default DynamicCache; None (transformers' cache stays) otherwise."""
    state = _state_of(model)
    if state is None or not state.auto:
        return None
    if not compat.default_cache_requested(generation_config, generation_mode):
        return None
    if getattr(model.config, "is_encoder_decoder", False) or model_kwargs.get("inputs_embeds") is not None:
        return None
    if state.unsupported:
        warn_once(
            f"{type(model).__name__} cannot reuse K/V: {state.unsupported}",
            "generate() uses transformers' DynamicCache (no reuse)",
        )
        return None
    cache = PooledCache(model)
    cache._call.auto = True
    cache._user_defined = False  # generate() treats it as its own cache (not returned unless asked)
    cache._on_generate_start()  # what generate() does to a caller's cache, through _is_user_defined
    return cache


def _state_of(model) -> ModelState | None:
    """The model's state; a copy of an enabled model is enabled like the original on first use."""
    state = states.get(model)
    if state is not None:
        return state
    mode = model.__dict__.get(_MARK)
    if not isinstance(mode, _Mode) or not mode.auto:
        return None
    enable(model, mode.pool, auto=True)
    return states.get(model)
