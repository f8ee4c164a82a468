"""``enable(model)``: the hooks that let a model's PooledCache reuse K/V, and the per-model entry
points (``get_pool``, ``weights_changed``)."""

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

__all__ = ["enable", "get_pool", "model_state", "weights_changed"]

_OWN_HOOKS = (pre_forward, post_forward)


def enable(model: torch.nn.Module, pool: KVPool | None = None) -> torch.nn.Module:
    """Let ``PooledCache()`` reuse K/V for ``model``. Idempotent; returns the model enabled.

    Args:
        model: a transformers causal LM (``*ForCausalLM``), or a PEFT model wrapping one (the
            hooks then go on the wrapped model, which ``PeftModel.generate`` runs).
        pool: the pool to serve this model by default; default: a new :class:`KVPool`. Passing a
            different pool to an already enabled model switches its default pool.
    """
    model = compat.unwrap_model(model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"enable() takes a torch.nn.Module (a transformers model), got {type(model).__name__}"
        )
    with states_lock:
        state = states.get(model)
        if state is None:
            state = ModelState(weakref.ref(model), pool or KVPool(), ModelFingerprint(model, _OWN_HOOKS))
            _inspect(model, state)
            # a copy of an enabled model carries our hooks without a state
            compat.remove_forward_hooks(model, _OWN_HOOKS)
            state.handles = [
                model.register_forward_pre_hook(pre_forward, with_kwargs=True),
                model.register_forward_hook(post_forward, with_kwargs=True),
            ]
            states[model] = state
        elif pool is not None:
            state.pool = pool
    return model


def get_pool(model: torch.nn.Module) -> KVPool:
    """The pool that serves ``model`` by default (enables the model if needed)."""
    return states[enable(model)].pool


def model_state(model: torch.nn.Module) -> ModelState:
    """What ``enable()`` attached to ``model`` (KeyError if it was never enabled)."""
    return states[compat.unwrap_model(model)]


def weights_changed(model: torch.nn.Module) -> None:
    """Tell hf_kvpool that weights changed in a way version counters miss (writes through ``.data``).

    Optimizer steps, ``load_state_dict`` and in-place ops under ``torch.no_grad`` are seen without it.
    """
    state = states.get(compat.unwrap_model(model))
    if state is not None:
        state.fingerprint.invalidate()


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
