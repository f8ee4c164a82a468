"""One generate() call on a PooledCache, from start to end: its state, the two forward hooks that
drive it, and the tracker that commits its blocks.

States of a :class:`CallState` (one per cache):

- *bound*: the cache knows its model (``bind``), from its first use by an enabled model on;
- *armed*: generate() started with the cache (``generate_started``); its first forward is a prefill
  that may take pooled K/V;
- *tracking*: after the prefill, a :class:`CallTracker` records every layer's new K/V (from
  ``update()``) and the new token ids (from the pre-hook), and the post-hook commits each block a
  row completes. Rearranging rows (beam search, assisted decoding) or an error ends tracking.

The hooks, registered on the causal-LM module by ``enable()``:

- forward *pre*-hook: on a prefill, look every row up in the pool, fill the cache with the C
  leading columns all rows can take, and trim ``input_ids`` / ``position_ids`` to the last ``L - C``
  columns (the 2D mask stays full; generate() keeps its own full inputs, so decoding continues as
  usual). On later forwards, hand the new token ids to the tracker: O(1), no host sync;
- forward *post*-hook: commit what is due (``CallTracker.commit_if_due``).

Hooks run from ``Module.__call__``, so accelerate's hooks (which wrap ``forward``) do not hide them.
Where reuse is not safe, the call runs as with DynamicCache and a warning says so once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..core.hashing import Chain, block_hashes, extend_chain, namespace_key
from ..core.pool import KVPool, PoolConfigError, token_column
from . import prefill, registry
from .layers import AppendLayer, fill_layer, spare_columns
from .registry import ModelState, warn_once

__all__ = ["CallState", "CallTracker", "LayersWithoutKV", "pre_forward", "post_forward"]

_CACHE_KWARGS = ("cache", "past_key_values")
_PER_TOKEN_KWARGS = ("position_ids", "token_type_ids")


class LayersWithoutKV(Exception):
    """Some layers gave no K/V through ``update()`` in a forward (KV sharing, recurrent state...)."""

    def __init__(self, any_recorded: bool):
        super().__init__("some layers gave no K/V through the cache")
        self.any_recorded = any_recorded  # others did: a trait of the model, not of this call


class CallState:
    """What a PooledCache knows of the calls that use it (see module docstring).

    ``on_bind(state)`` is the cache's own step when it first meets its model (laying out its layers).
    """

    def __init__(self, on_bind: Callable[[ModelState], None]):
        self.binding: ModelState | None = None
        self.armed = False
        self.tracker: CallTracker | None = None
        self.reused_tokens: list[int] = []
        self._on_bind = on_bind

    def bind(self, state: ModelState) -> None:
        if self.binding is not None and self.binding is not state:
            other = self.binding.model
            raise ValueError(
                f"this PooledCache is bound to another model ({type(other).__name__} at {id(other):#x}); "
                "create one PooledCache per model: PooledCache(model)"
            )
        if self.binding is None:
            self._on_bind(state)
            self.binding = state

    def generate_started(self) -> None:
        self.tracker = None
        self.armed = True

    def take_prefill(self) -> bool:
        """A prefill starts: whether generate() armed it (then it may skip columns)."""
        armed, self.armed = self.armed, False
        self.tracker = None
        self.reused_tokens = []
        return armed

    def stop(self) -> None:
        """Nothing more is committed in this call (the cache goes on as a DynamicCache)."""
        self.tracker = None

    def reset(self) -> None:
        self.tracker = None
        self.armed = False

    def on_update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.tracker is not None:
            self.tracker.record(layer_idx, keys, values)
        elif self.binding is None:
            warn_once(
                "PooledCache() is used by a model that was never enabled, so it behaves like DynamicCache "
                "and reuses nothing. Call hf_kvpool.enable(model) once, or pass PooledCache(model)",
                "nothing is pooled",
            )
        elif self.armed:
            # generate() started with this cache, but the bound model's hook never saw the prefill:
            # another model is running it.
            self.armed = False
            model = self.binding.model
            raise ValueError(
                f"this PooledCache is bound to another model ({type(model).__name__} at {id(model):#x}); "
                "create one PooledCache per model: PooledCache(model)"
            )


class CallTracker:
    """Which tokens each row holds and which K/V are still to be committed, for one call.

    Column ``token_column(pads[b], t)`` of row ``b`` holds token ``t`` of that row at position ``t``.
    """

    def __init__(
        self,
        pool: KVPool,
        namespace: bytes,
        num_layers: int,
        pads: list[int],
        tokens: list[np.ndarray],
        chains: list[Chain],
        reused_columns: int,
        total_columns: int,
    ):
        self.pool = pool
        self.namespace = namespace
        self.bs = pool.block_size
        self.pads = pads
        self.tokens = tokens  # per row: real token ids known on the host
        self.chains = chains  # per row: keys of every full block so far
        # per row: first chain index not yet committed; blocks before it came from the pool
        self.pending = [max(0, -(-(reused_columns - p) // self.bs)) for p in pads]
        self.base = reused_columns  # column of the first recorded K/V
        self.columns = total_columns  # columns the cache holds after this forward
        self.layer_chunks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]
        self.token_chunks: list[torch.Tensor] = []  # [B, n] ids not yet copied to the host
        self.next_due = 0  # commit when self.columns >= next_due (prefill: at once)

    # ---------------------------------------------------------------- hot path
    def record(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V of the new columns of one layer, ``[B, H, n, D]`` (kept by reference)."""
        self.layer_chunks[layer_idx].append((keys, values))

    def add_tokens(self, input_ids: torch.Tensor) -> None:
        """Token ids ``[B, n]`` fed to a forward after the prefill (stay on the device)."""
        self.token_chunks.append(input_ids)
        self.columns += input_ids.shape[1]

    def commit_if_due(self) -> int:
        if self.columns < self.next_due:
            return 0
        return self._commit()

    # ---------------------------------------------------------------- commit
    def _commit(self) -> int:
        if any(not chunks for chunks in self.layer_chunks):
            raise LayersWithoutKV(any_recorded=any(self.layer_chunks))
        if self.token_chunks:
            new_ids = torch.cat(self.token_chunks, dim=1).cpu().numpy()  # the one host sync
            self.token_chunks = []
            self.tokens = [np.concatenate([t, new_ids[b]]) for b, t in enumerate(self.tokens)]
        for chain, tokens in zip(self.chains, self.tokens):
            extend_chain(chain, tokens, self.bs, self.namespace)
        layer_kv = [
            (torch.cat([k for k, _ in chunks], dim=2), torch.cat([v for _, v in chunks], dim=2))
            if len(chunks) > 1
            else chunks[0]
            for chunks in self.layer_chunks
        ]
        written = 0
        for b, chain in enumerate(self.chains):
            if self.pending[b] >= len(chain):
                continue
            first = token_column(self.pads[b], 0) - self.base  # column (in layer_kv) of token 0 of row b
            written += self.pool.commit(chain, self.pending[b], layer_kv, b, first, self.namespace)
            self.pending[b] = len(chain)
        # keep only the columns a later block can still need
        new_base = min(token_column(p, n * self.bs) for p, n in zip(self.pads, self.pending))
        cut = new_base - self.base
        # clone: a view would keep the whole prefill K/V alive
        self.layer_chunks = [[(k[:, :, cut:].clone(), v[:, :, cut:].clone())] for k, v in layer_kv]
        self.base = new_base
        self.next_due = min(token_column(p, (len(c) + 1) * self.bs) for p, c in zip(self.pads, self.chains))
        return written


# ---------------------------------------------------------------------------- hooks
def _find_call(kwargs: dict):
    """``(cache, its CallState)`` if the forward was given a PooledCache, else None."""
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            call = getattr(cache, "_call", None)
            return (cache, call) if isinstance(call, CallState) else None
    return None


def pre_forward(module, args, kwargs):
    found = _find_call(kwargs)
    if found is None:
        return None
    cache, call = found
    state = registry.states.get(module)
    if state is None:  # a copy of an enabled model: its hooks came along, its state did not
        return None
    call.bind(state)
    if state.unsupported:
        warn_once(f"{type(module).__name__} cannot reuse K/V: {state.unsupported}")
        call.reset()
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if cache.get_seq_length() > 0:  # a later forward of the same generation (decode, chunk)
        if call.tracker is not None:
            if input_ids is not None:
                call.tracker.add_tokens(input_ids)
            else:
                call.stop()
        return None
    armed = call.take_prefill()
    if input_ids is None:
        warn_once("inputs_embeds without input_ids cannot be matched to pooled tokens")
        return None
    if kwargs.get("use_cache") is False:
        return None  # the model will neither read nor fill the cache
    if input_ids.ndim != 2:
        warn_once(f"input_ids of shape {tuple(input_ids.shape)} are not [batch, seq]")
        return None
    return _prefill(module, state, cache, call, input_ids, args, kwargs, armed)


def _prefill(module, state: ModelState, cache, call: CallState, input_ids, args, kwargs, armed: bool):
    batch, length = input_ids.shape
    call.reused_tokens = [0] * batch
    ids = input_ids.cpu().numpy()
    pads = prefill.left_pads(kwargs.get("attention_mask"), batch, length)
    if pads is None:
        warn_once("the attention mask is not left padding (zeros, then ones, per row)")
        return None
    if not prefill.positions_match(kwargs.get("position_ids"), pads, length):
        warn_once("position_ids are not the positions of a left-padded prompt")
        return None
    prefill.check_vocab(module, ids, pads)
    scan = state.fingerprint.scan()
    if scan.foreign_hooks:
        # a hook may change K/V in ways no attribute shows: neither read nor fill the pool
        warn_once(
            f"forward hooks that may change K/V are registered ({'; '.join(scan.foreign_hooks[:3])}), so "
            "calls compute without the pool while they are; a hook that changes no value can say so "
            "with `hook.hf_kvpool_passive = True`"
        )
        return None

    pool = cache.pool
    fingerprint = state.fingerprint.digest(scan)
    namespace = _namespace(pool, fingerprint, cache.salt)
    tokens = [ids[b, pads[b] :] for b in range(batch)]
    chains = [block_hashes(t, pool.block_size, namespace) for t in tokens]

    max_columns = 0
    if armed:
        max_columns, why_not = prefill.reusable_columns(module, kwargs, length)
        if why_not:
            warn_once(why_not)
    else:
        warn_once(
            "a forward called outside generate() returns every position, so it is computed in full "
            "(its blocks are still stored for later generate() calls)"
        )
    columns = _fill_from_pool(cache, pool, chains, pads, tokens, max_columns, namespace, length)
    call.reused_tokens = [max(0, columns - p) for p in pads]
    call.tracker = CallTracker(pool, namespace, len(cache.layers), pads, tokens, chains, columns, length)
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


def _namespace(pool: KVPool, fingerprint: bytes, salt: str | bytes | None) -> bytes:
    # parts are length-prefixed: no salt and an empty salt are different namespaces
    namespace = namespace_key(fingerprint) if salt is None else namespace_key(fingerprint, salt)
    if namespace not in pool.namespaces:  # what a snapshot records about its blocks
        shown = salt.hex() if isinstance(salt, bytes) else salt
        pool.namespaces[namespace] = {"model": fingerprint.hex(), "salt": shown}
    return namespace


def _fill_from_pool(cache, pool, chains, pads, tokens, max_columns, namespace, length) -> int:
    """Fill the empty cache with the leading columns every row can take; returns how many."""
    if max_columns <= 0:
        return 0
    # layers that append in place get their buffer straight from the gather, with room for this
    # prompt and some decoding
    room = [length + spare_columns(length) if isinstance(layer, AppendLayer) else 0 for layer in cache.layers]
    try:
        fetched = pool.fetch(chains, pads, sum(len(t) for t in tokens), max_columns, namespace, room)
    except Exception as exc:  # a failed gather (e.g. out of memory): compute everything
        warn_once(f"reading the pool failed ({type(exc).__name__}: {exc})")
        return 0
    for layer, (k, v) in zip(cache.layers, fetched.layer_kv or ()):
        fill_layer(layer, k, v, fetched.columns)
    return fetched.columns


def post_forward(module, args, kwargs, output):
    found = _find_call(kwargs)
    if found is None or found[1].tracker is None:
        return None
    call = found[1]
    try:
        call.tracker.commit_if_due()
    except PoolConfigError:  # a user error: say it, do not swallow it
        call.stop()
        raise
    except LayersWithoutKV as exc:
        call.stop()
        if exc.any_recorded:  # some layers gave K/V and others none: a trait of the model
            state = registry.states.get(module)
            if state is not None:
                state.unsupported = "some layers produce no K/V through the cache (KV sharing?)"
            warn_once(
                f"{type(module).__name__} cannot reuse K/V: some layers produce no K/V through the cache"
            )
    except Exception as exc:  # committing is best effort: the output is already correct
        call.stop()
        warn_once(f"writing to the pool failed ({type(exc).__name__}: {exc})")
    return None
