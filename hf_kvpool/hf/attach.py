"""What ``enable()`` attaches to a model: its state (pool, fingerprint, cache-layer kinds) and the
forward hooks that let its PooledCaches reuse K/V. Internal: ``PooledCache(model)`` and
``get_pool`` attach a model without changing its mode; the public ``enable()`` (``enable.py``)
also sets the mode (auto or explicit)."""

from __future__ import annotations

import weakref

import torch
from transformers import DynamicCache

from ..core.pool import KVPool
from . import compat
from .call import post_forward, pre_forward
from .fingerprint import ModelFingerprint
from .kinds import kinds_of
from .registry import ModelState, states, states_lock

__all__ = ["OWN_HOOKS", "attach", "model_state"]

OWN_HOOKS = (pre_forward, post_forward)


def attach(model: torch.nn.Module, pool: KVPool | None = None) -> ModelState:
    """The state of ``model`` (a PEFT wrapper's inner model), created with its hooks on first call.

    ``pool``: the model's default pool (a new :class:`KVPool` for a new state; given for a model
    already attached, it replaces the default pool).
    """
    model = compat.unwrap_model(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"enable() takes a torch.nn.Module (a transformers model), got {type(model).__name__}"
        )
    with states_lock:
        state = states.get(model)
        if state is None:
            state = ModelState(weakref.ref(model), pool or KVPool(), ModelFingerprint(model, OWN_HOOKS))
            _inspect(model, state)
            # a copy of an enabled model carries our hooks without a state
            compat.remove_forward_hooks(model, OWN_HOOKS)
            state.handles = [
                model.register_forward_pre_hook(pre_forward, with_kwargs=True),
                model.register_forward_hook(post_forward, with_kwargs=True),
            ]
            states[model] = state
        elif pool is not None:
            state.pool = pool
    return state


def model_state(model: torch.nn.Module) -> ModelState:
    """What ``enable()`` attached to ``model`` (KeyError if it was never enabled)."""
    return states[compat.unwrap_model(model)]


def _inspect(model: torch.nn.Module, state: ModelState) -> None:
    """The model's cache-layer kinds, or why the pool cannot serve it (found before any storage)."""
    problem = compat.transformers_version_problem()
    if problem:
        state.unsupported = problem
        return
    config = getattr(model, "config", None)
    if config is None:
        state.unsupported = "the model has no transformers config"
        return
    if getattr(config, "is_encoder_decoder", False):
        state.unsupported = "encoder-decoder models are not supported"
        return
    if compat.refuses_outside_caches(model):
        state.unsupported = f"{type(model).__name__} takes no cache but its own in generate()"
        state.consequence = (
            "generate(cache=PooledCache(...)) raises in the model: call generate() without cache="
        )
        return
    text_config = config.get_text_config(decoder=True)
    state.kinds, state.unsupported = kinds_of(DynamicCache(config=text_config).layers)
    state.single_steps = compat.continues_one_token_at_a_time(text_config)
