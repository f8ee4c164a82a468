"""How a PooledCache meets a transformers model: ``enable()``, and the two forward hooks.

``enable(model)`` registers, on the causal-LM module itself,

- a forward *pre*-hook. On the first forward of a generate() call it looks every row's prompt up
  in the pool, fills the cache with the C leading columns that all rows can take from it, and
  trims ``input_ids`` / ``position_ids`` to the last ``L - C`` columns; the 2D attention mask stays
  at full length. generate() keeps its own full inputs, so decoding continues as usual (greedy,
  sampling, left-padded batches, beam search, assisted decoding). On later forwards it only
  hands the new token ids to the call's tracker: O(1), no host sync.
- a forward *post*-hook that commits blocks a row has completed (``tracking.py``).

Hooks run from ``Module.__call__``, so accelerate's hooks (which wrap ``forward``) do not hide them.
Where reuse is not safe, the call runs as with DynamicCache and a warning says so once.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from . import compat
from .cache import PooledCache
from .fingerprint import ModelFingerprint
from .hashing import block_hashes, namespace_key
from .layers import AppendLayer, adopt, spare_columns
from .pool import KVPool, PoolConfigError
from .tracking import CallTracker, _UnsupportedLayers

__all__ = ["enable", "get_pool", "weights_changed", "model_state", "ModelState"]

_SUPPORTED_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, AppendLayer)
_CACHE_KWARGS = ("cache", "past_key_values")
_PER_TOKEN_KWARGS = ("position_ids", "token_type_ids")

_states: weakref.WeakKeyDictionary[torch.nn.Module, ModelState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()
_warned: set[str] = set()


@dataclass
class ModelState:
    """What ``enable()`` attaches to a model (kept in a registry, not on the module)."""

    model_ref: weakref.ref
    pool: KVPool
    fingerprint: ModelFingerprint
    unsupported: str | None = None  # why this model cannot reuse K/V, if it cannot
    handles: list = field(default_factory=list)

    @property
    def model(self) -> torch.nn.Module:
        return self.model_ref()


def enable(model: torch.nn.Module, pool: KVPool | None = None) -> torch.nn.Module:
    """Let ``PooledCache()`` reuse K/V for ``model``. Idempotent; returns ``model``.

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
    with _states_lock:
        state = _states.get(model)
        if state is None:
            fingerprint = ModelFingerprint(model, own_hooks=(_pre_forward, _post_forward))
            state = ModelState(weakref.ref(model), pool or KVPool(), fingerprint)
            state.unsupported = _why_unsupported(model)
            # a copy of an enabled model carries them without a state
            compat.remove_forward_hooks(model, (_pre_forward, _post_forward))
            state.handles = [
                model.register_forward_pre_hook(_pre_forward, with_kwargs=True),
                model.register_forward_hook(_post_forward, with_kwargs=True),
            ]
            _states[model] = state
        elif pool is not None:
            state.pool = pool
    return model


def get_pool(model: torch.nn.Module) -> KVPool:
    """The pool that serves ``model`` by default (enables the model if needed)."""
    model = enable(model)
    return _states[model].pool


def model_state(model: torch.nn.Module) -> ModelState:
    return _states[compat.unwrap_model(model)]


def weights_changed(model: torch.nn.Module) -> None:
    """Tell hf_kvpool that weights changed in a way version counters miss (writes through ``.data``).

    Optimizer steps, ``load_state_dict`` and in-place ops under ``torch.no_grad`` are seen without it.
    """
    model = compat.unwrap_model(model)
    if model in _states:
        _states[model].fingerprint.invalidate()


def _why_unsupported(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return "the model has no transformers config"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    probe = PooledCache(config=config.get_text_config(decoder=True))
    for layer in probe.layers:
        if type(layer) not in _SUPPORTED_LAYERS:
            return f"it has {type(layer).__name__} cache layers (only attention K/V can be reused)"
    return None


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hf_kvpool: {reason}; this call runs as with DynamicCache (no reuse).", stacklevel=4)


def _find_cache(kwargs: dict) -> PooledCache | None:
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache if isinstance(cache, PooledCache) else None
    return None


# ---------------------------------------------------------------------------- pre-hook
def _pre_forward(module, args, kwargs):
    cache = _find_cache(kwargs)
    if cache is None:
        return None
    state = _states.get(module)
    if state is None:  # a copy of an enabled model: its hooks came along, its state did not
        return None
    if cache._state is not state:
        cache._bind(state)
    if state.unsupported:
        _warn_once(f"{type(module).__name__} cannot reuse K/V: {state.unsupported}")
        cache._reset_call()
        return None

    input_ids = kwargs.get("input_ids", args[0] if args else None)
    tracker = cache._tracker
    if cache.get_seq_length() > 0:  # a later forward of the same generation (decode, chunk)
        if tracker is not None and input_ids is not None:
            tracker.add_tokens(input_ids)
        elif tracker is not None:
            cache._tracker = None
        return None

    # ---- prefill: the cache is empty
    armed, cache._armed = cache._armed, False
    cache._tracker = None
    cache.reused_tokens = []
    if input_ids is None:
        _warn_once("inputs_embeds without input_ids cannot be matched to pooled tokens")
        return None
    if kwargs.get("use_cache") is False:
        return None  # the model will neither read nor fill the cache
    if input_ids.ndim != 2:
        _warn_once(f"input_ids of shape {tuple(input_ids.shape)} are not [batch, seq]")
        return None
    return _prefill(module, state, cache, input_ids, args, kwargs, armed)


def _prefill(module, state: ModelState, cache: PooledCache, input_ids, args, kwargs, armed: bool):
    batch, length = input_ids.shape
    cache.reused_tokens = [0] * batch
    ids = input_ids.cpu().numpy()
    pads = _left_pads(kwargs.get("attention_mask"), batch, length)
    if pads is None:
        _warn_once("the attention mask is not left padding (zeros, then ones, per row)")
        return None
    position_ids = kwargs.get("position_ids")
    if not _positions_match(position_ids, pads, length):
        _warn_once("position_ids are not the positions of a left-padded prompt")
        return None
    _check_vocab(module, ids, pads)

    scan = state.fingerprint.scan()
    if scan.foreign_hooks:
        # a hook may change K/V in ways no attribute shows: neither read nor fill the pool
        _warn_once(
            f"forward hooks that may change K/V are registered ({'; '.join(scan.foreign_hooks[:3])}), so "
            "calls compute without the pool while they are; a hook that changes no value can say so "
            "with `hook.hf_kvpool_passive = True`"
        )
        return None
    pool = cache.pool
    salt = cache.salt
    fingerprint = state.fingerprint.digest(scan)
    # parts are length-prefixed: no salt and an empty salt are different namespaces
    namespace = namespace_key(fingerprint) if salt is None else namespace_key(fingerprint, salt)
    if namespace not in pool.namespaces:  # what a snapshot records about its blocks
        pool.namespaces[namespace] = {"model": fingerprint.hex(), "salt": _salt_text(salt)}
    tokens = [ids[b, pads[b] :] for b in range(batch)]
    chains = [block_hashes(t, pool.block_size, namespace) for t in tokens]

    if armed:
        max_columns = _reusable_columns(module, kwargs, length)
    else:
        max_columns = 0
        _warn_once(
            "a forward called outside generate() returns every position, so it is computed in full "
            "(its blocks are still stored for later generate() calls)"
        )
    columns = 0
    if max_columns > 0:
        try:
            # layers that append in place get their buffer straight from the gather, with room
            # for this prompt and some decoding
            room = [
                length + spare_columns(length) if isinstance(layer, AppendLayer) else 0
                for layer in cache.layers
            ]
            fetched = pool.fetch(chains, pads, sum(len(t) for t in tokens), max_columns, namespace, room)
        except Exception as exc:  # a failed gather (e.g. out of memory): compute everything
            _warn_once(f"reading the pool failed ({type(exc).__name__}: {exc})")
            fetched = None
        if fetched is not None and fetched.columns > 0:
            columns = fetched.columns
            for layer, (k, v) in zip(cache.layers, fetched.layer_kv):
                _fill_layer(layer, k, v, columns)
    cache.reused_tokens = [max(0, columns - p) for p in pads]
    cache._tracker = CallTracker(pool, namespace, len(cache.layers), pads, tokens, chains, columns, length)
    if columns == 0:
        return None

    keep = length - columns
    if args:
        args = (input_ids[:, -keep:], *args[1:])
    else:
        kwargs["input_ids"] = input_ids[:, -keep:]
    for name in _PER_TOKEN_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == length:
            kwargs[name] = value[..., -keep:]
    return args, kwargs


def _salt_text(salt: str | bytes | None) -> str | None:
    return salt.hex() if isinstance(salt, bytes) else salt


def _left_pads(mask, batch: int, length: int) -> list[int] | None:
    """Per-row count of leading pad columns, or None if the mask is not left padding."""
    if mask is None:
        return [0] * batch
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != batch:
        return None
    m = mask.cpu().numpy().astype(bool)[:, -length:] if mask.shape[1] >= length else None
    if m is None:
        return None
    pads = (~m).cumprod(axis=1).sum(axis=1)
    if not all(m[b, p:].all() for b, p in enumerate(pads)):
        return None
    return [int(p) for p in pads]


def _positions_match(position_ids, pads: list[int], length: int) -> bool:
    """The pool stores K at position = index of the token in its row (pads excluded)."""
    if position_ids is None:
        return not any(pads)  # the model counts positions from 0 over every column
    if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2:
        return False
    pos = position_ids.cpu().numpy()
    for b, p in enumerate(pads):
        row = pos[min(b, pos.shape[0] - 1)]
        if not np.array_equal(row[p:], np.arange(length - p)):
            return False
    return True


def _check_vocab(module, ids: np.ndarray, pads: list[int]) -> None:
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        return
    for b, p in enumerate(pads):
        row = ids[b, p:]
        if row.size and (row.min() < 0 or row.max() >= vocab):
            bad = int(row.min()) if row.min() < 0 else int(row.max())
            raise ValueError(
                f"input_ids row {b} holds token id {bad}, outside this model's vocabulary [0, {vocab}); "
                "check that the tokenizer matches the model"
            )


def _reusable_columns(module, kwargs: dict, length: int) -> int:
    """How many leading columns may be skipped without changing what the caller gets back."""
    keep = kwargs.get("logits_to_keep", 0)
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        _warn_once("the forward wants logits for every position (a direct call, or logits_to_keep=0)")
        return 0
    config = getattr(module, "config", None)
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag, getattr(config, flag, False)):
            _warn_once(f"{flag}=True wants outputs for every prompt position")
            return 0
    if kwargs.get("use_cache") is False:
        return 0  # the model will not read the cache
    if kwargs.get("labels") is not None:
        _warn_once("labels need logits for every position")
        return 0
    return length - keep


def _fill_layer(layer, keys: torch.Tensor, values: torch.Tensor, columns: int) -> None:
    """Put pooled K/V (``[B, H, >= columns, D]``, the first ``columns`` filled) into an empty layer,
    holding what ``layer.update`` would hold after receiving those columns."""
    if isinstance(layer, AppendLayer):
        adopt(layer, keys, values, columns)
        return
    keys, values = keys[:, :, :columns], values[:, :, :columns]
    layer.lazy_initialization(keys, values)
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.cumulative_length = columns
        if not layer.record_past:
            # a copy of the window: a view would keep the whole gathered prefix alive
            keys = keys[:, :, -layer.sliding_window + 1 :, :].clone()
            values = values[:, :, -layer.sliding_window + 1 :, :].clone()
    layer.keys, layer.values = keys, values


# ---------------------------------------------------------------------------- post-hook
def _post_forward(module, args, kwargs, output):
    cache = _find_cache(kwargs)
    if cache is None or cache._tracker is None:
        return None
    try:
        cache._tracker.commit_if_due()
    except PoolConfigError:  # a user error: say it, do not swallow it
        cache._tracker = None
        raise
    except _UnsupportedLayers as exc:
        cache._tracker = None
        if exc.args and exc.args[0]:  # some layers gave K/V and others none: a structural trait
            state = _states.get(module)
            if state is not None:
                state.unsupported = "some layers produce no K/V through the cache (KV sharing?)"
            _warn_once(
                f"{type(module).__name__} cannot reuse K/V: some layers produce no K/V through the cache"
            )
    except Exception as exc:  # committing is best effort: the output is already correct
        cache._tracker = None
        _warn_once(f"writing to the pool failed ({type(exc).__name__}: {exc})")
    return None
