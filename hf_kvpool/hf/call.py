"""One generate() call on a PooledCache, from start to end: its state and the two forward hooks
that drive it (what it commits is ``tracker.py``'s).

States of a :class:`CallState` (one per cache):

- *bound*: the cache knows its model (``bind``), from its first use by an enabled model on;
- *armed*: generate() started with the cache (``generate_started``); its first forward is a prefill
  that may take pooled state and skip the columns it covers;
- *tracking*: after the prefill, a :class:`~hf_kvpool.hf.tracker.CallTracker` records every layer's
  new per-token tensors and the new token ids, and commits each block a row completes.
  Rearranging rows (beam search, assisted decoding) or an error ends tracking.

The hooks, registered on the causal-LM module by ``enable()``:

- forward *pre*-hook: on a prefill, look every row up in the pool, restore the C leading columns
  all rows can take into the empty cache (in a batch, after rows that are behind catch up, which
  may let it take rows whole: ``catchup.py``), and trim ``input_ids`` / ``position_ids`` to the rest
  (the 2D mask stays full; generate() keeps its own full inputs, so decoding continues as usual).
  For models with recurrent state, the prefill runs in two forwards split at the prompt's last
  block boundary, so that a checkpoint of the state lands there. On later forwards, hand the new
  token ids to the tracker: O(1), no host sync;
- forward *post*-hook: commit what is due.

Hooks run from ``Module.__call__``, so accelerate's hooks (which wrap ``forward``) do not hide them.
Where reuse is not safe, the call runs as with DynamicCache and a warning says so once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from ..core.pool import PoolConfigError
from . import catchup, compat, live, prefill, registry, scratch
from .registry import ModelState, warn_once
from .tracker import CallTracker, split_name

__all__ = ["CallState", "pre_forward", "post_forward"]

_CACHE_KWARGS = ("cache", "past_key_values")
_PER_TOKEN_KWARGS = ("position_ids", "token_type_ids")


class CallState:
    """What a PooledCache knows of the calls that use it (see module docstring).

    ``on_bind(state)`` is the cache's own step when it first meets its model (laying out its layers).
    """

    def __init__(self, on_bind: Callable[[ModelState], None]):
        # held weakly: the cache holds this state; a cycle would keep dropped caches' K/V until a GC
        on_bind = weakref.WeakMethod(on_bind) if hasattr(on_bind, "__self__") else on_bind
        self.binding: ModelState | None = None
        self.armed = False
        self.inner = False  # a prefill piece the pre-hook runs itself is in progress
        self.internal = False  # a catch-up's scratch call: its look-ups are not the caller's
        self.auto = False  # the cache was made by generate() (auto mode), not by the caller
        self.tracker: CallTracker | None = None
        self.reused_tokens: list[int] = []
        self.live: live.Live | None = None  # what the cache held after its last call (``live.py``)
        self._on_bind = on_bind

    def bind(self, state: ModelState) -> None:
        if self.binding is not None and self.binding is not state:
            other = self.binding.model
            raise ValueError(
                f"this PooledCache is bound to another model ({type(other).__name__} at {id(other):#x}); "
                "create one PooledCache per model: PooledCache(model)"
            )
        if self.binding is None:
            on_bind = self._on_bind() if isinstance(self._on_bind, weakref.WeakMethod) else self._on_bind
            if on_bind is not None:
                on_bind(state)
            self.binding = state

    def generate_started(self, cache=None) -> None:
        """generate() starts; ``cache`` (about to be emptied) may be continued from (``live.py``)."""
        self.live = live.keep(self, cache) if cache is not None else None
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
        self.live = None

    def on_update(self, layer_idx: int, method: str, args: tuple) -> None:
        """``cache.<method>(*args, layer_idx)`` was called (``update``, ``update_indexer``)."""
        if self.tracker is not None:
            self.tracker.record(layer_idx, self.binding.kinds[layer_idx].record(method, args))
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
    if found is None or found[1].inner:
        return None
    cache, call = found
    state = registry.states.get(module)
    if state is None:  # a copy of an enabled model: its hooks came along, its state did not
        return None
    call.bind(state)
    if state.unsupported:
        warn_once(f"{type(module).__name__} cannot reuse K/V: {state.unsupported}", state.consequence)
        call.reset()
        return None
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if compat.holds_tokens(cache):  # a later forward of the same generation (decode, chunk)
        if call.tracker is not None:
            if input_ids is not None:
                call.tracker.add_tokens(input_ids)
            else:
                call.stop()
        return None
    armed = call.take_prefill()
    held_before, call.live = call.live, None  # what the cache held after its last call, if anything
    if input_ids is None:
        warn_once("inputs_embeds without input_ids cannot be matched to pooled tokens")
        return None
    if kwargs.get("use_cache") is False:
        return None  # the model will neither read nor fill the cache
    if input_ids.ndim != 2:
        warn_once(f"input_ids of shape {tuple(input_ids.shape)} are not [batch, seq]")
        return None
    return _prefill(module, state, cache, call, input_ids, args, kwargs, armed, held_before)


def _prefill(
    module, state: ModelState, cache, call: CallState, input_ids, args, kwargs, armed: bool, previous=None
):
    batch, length = input_ids.shape
    call.reused_tokens = [0] * batch
    ids = input_ids.cpu().numpy()
    pads = prefill.left_pads(kwargs.get("attention_mask"), batch, length)
    if pads is None:
        warn_once("the attention mask is not left padding (zeros, then ones, per row)")
        return None
    if state.attends and not prefill.positions_match(kwargs.get("position_ids"), pads, length):
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
    digest = state.fingerprint.digest(scan)
    registry.retire(state, pool, state.fingerprint.take_retired())
    autocast = compat.autocast_state(module, scan.devices | {input_ids.device.type})
    namespace = registry.namespace(pool, digest, cache.salt, autocast)
    tokens = [ids[b, pads[b] :] for b in range(batch)]
    chains = [pool.chains.chain(t, pool.block_size, namespace) for t in tokens]
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
    if any(pads) and not state.pad_invariant:
        max_columns = 0  # the model's state depends on the padding (the tracker pools no padded row either)
    if max_columns > 0 and pool.layout is None and pool.remote is not None:
        scratch.lay_out_pool(module, cache, state, namespace, input_ids[:1, pads[0] : pads[0] + 1])
    restorable = max_columns
    if state.single_steps and max_columns > 0:
        restorable = _single_step_limit(pool, state, chains, pads, length, max_columns, input_ids.device)
    held = live.columns(previous, namespace, tokens, pads, restorable)
    pool_has = pool.reusable_tokens(chains)[0] if held else 0
    held = held if held >= pool_has else 0  # the pool serves more (another branch): gather instead
    jobs, whole = [], False
    if max_columns > 0 and not held:
        jobs, whole = catchup.plan(pool, state, chains, pads, tokens, length, max_columns, input_ids.device)
    scratches = {
        row: scratch.catch_up(module, cache, state, tokens[row][: target + 1], input_ids.device)
        for row, target in jobs
    }
    if held:  # continue from the buffers the cache held: nothing copied out of the pool
        streams, states = live.restore(previous, cache, held), {i: {} for i in range(len(cache.layers))}
        pooled = pool_has  # the tracker commits what the pool lacks (evicted since)
        if not call.internal:
            pool.count_lookup(len(tokens[0]), held)
    else:
        pooled, streams, states = _fetch(
            cache, state, pool, chains, pads, tokens, restorable, namespace, length, not call.internal
        )
    columns = held or pooled
    if whole:  # every row's columns up to its last token: the pool's, then its catch-up's
        columns = catchup.fill(state, cache, streams, pooled, pads, tokens, scratches, length)
        if not call.internal:
            pool.count_hits(sum(max(0, columns - p) - max(0, pooled - p) for p in pads))
    if columns > 0 and not held:
        for i, kind in enumerate(state.kinds):
            kind.restore(cache, i, streams[i], columns, states[i])
    call.reused_tokens = [max(0, columns - p) for p in pads]
    call.tracker = CallTracker(pool, namespace, cache, state.kinds, pads, tokens, chains, pooled)
    if columns > pooled:  # the tracker commits what the pool did not serve (it may have been evicted)
        for i, layer_streams in streams.items():
            call.tracker.record(i, {n: t[:, :, pooled:columns] for n, t in layer_streams.items()})
        call.tracker.reach(columns)

    start = columns
    for stop in _pieces(state, pads, pool.block_size, columns, length, max_columns):
        _forward_piece(module, state, call, kwargs, input_ids, start, stop, length)
        if call.tracker is None:  # committing failed: the call goes on as with DynamicCache
            break
        start = stop
    if call.tracker is not None:
        call.tracker.reach(length)
    if start == 0:
        return None
    keep = length - start
    if args:
        args = (input_ids[:, -keep:], *args[1:])
    else:
        kwargs["input_ids"] = input_ids[:, -keep:]
    for name in _per_token_kwargs(state):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == length:
            kwargs[name] = value[..., -keep:]
    return args, kwargs


def _per_token_kwargs(state: ModelState) -> tuple[str, ...]:
    """Inputs cut with ``input_ids``. The 2D mask spans past and new columns for attention; models
    without attention (Mamba) multiply their inputs by it, so it spans the new columns only."""
    return _PER_TOKEN_KWARGS if state.attends else (*_PER_TOKEN_KWARGS, "attention_mask")


def _single_step_limit(pool, state, chains, pads, length, max_columns, device) -> int:
    """For models fed one token per forward after a restore: reuse only if the steps cost less
    than recomputing the columns they would save."""
    hint = min(p + n for p, n in zip(pads, pool.reusable_tokens(chains, state.checkpointed)))
    return max_columns if (length - 1 - hint) * catchup.forward_cost(device) < hint else 0


def _fetch(cache, state, pool, chains, pads, tokens, max_columns, namespace, length, count: bool):
    """The leading columns every row can take from the pool: their number, and per layer the
    gathered streams and checkpoint state (name -> tensor)."""
    streams: dict[int, dict] = {i: {} for i in range(len(cache.layers))}
    states: dict[int, dict] = {i: {} for i in range(len(cache.layers))}
    if max_columns <= 0:
        return 0, streams, states
    layout = pool.layout
    room = None
    if layout is not None:
        room = []
        for spec in layout[0]:
            index, _ = split_name(spec.name)
            room.append(state.kinds[index].room(cache.layers[index], length))
    try:
        fetched = pool.fetch(
            chains, pads, sum(len(t) for t in tokens), max_columns, namespace, room, state.checkpointed, count
        )
    except Exception as exc:  # a failed gather (e.g. out of memory): compute everything
        if pool.strict:
            raise
        warn_once(f"reading the pool failed ({type(exc).__name__}: {exc})")
        return 0, streams, states
    if fetched.columns == 0:
        return 0, streams, states
    layout = pool.layout
    for spec, t in zip(layout[0], fetched.streams):
        index, what = split_name(spec.name)
        streams[index][what] = t
    for spec, t in zip(layout[1], fetched.states or ()):
        index, what = split_name(spec.name)
        states[index][what] = t
    return fetched.columns, streams, states


def _pieces(
    state: ModelState, pads: list[int], bs: int, start: int, length: int, max_columns: int
) -> list[int]:
    """Where the prefill's own forwards stop, before the caller's forward computes the rest.

    Models with recurrent state stop at the prompt's last block boundary (a checkpoint lands
    there); models whose multi-token scan ignores a restored state go one token at a time after a
    restore. Other models: no pieces (one forward, as with DynamicCache).
    """
    if not state.checkpointed or max_columns <= 0:
        return []
    # the column where the most rows end a block (the largest on ties), before the last token
    candidates = [p + (length - 1 - p) // bs * bs for p in pads]
    stop = max(candidates, key=lambda c: (sum((c - p) % bs == 0 for p in pads), c))
    pieces = [stop] if start < stop <= max_columns else []
    if state.single_steps:
        # one multi-token forward only from an empty state; from a state on, one token per forward
        if start > 0:
            return list(range(start + 1, length))
        return pieces + list(range(stop + 1, length)) if pieces else []
    return pieces


def _forward_piece(
    module, state: ModelState, call: CallState, kwargs: dict, input_ids, start: int, stop: int, length: int
) -> None:
    """Run columns ``[start, stop)`` of the prefill through the model with this cache, then commit."""
    piece = {k: v for k, v in kwargs.items() if k not in ("input_ids", "labels")}
    piece["input_ids"] = input_ids[:, start:stop]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        piece["attention_mask"] = mask[:, : mask.shape[1] - (length - stop)]  # past and new columns
    for name in _per_token_kwargs(state):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.shape[-1] == length:
            piece[name] = value[..., start:stop]
    piece["logits_to_keep"] = 1
    call.inner = True
    try:
        module(**piece)
    finally:
        call.inner = False
    call.tracker.reach(stop)
    _commit(module, call)


def post_forward(module, args, kwargs, output):
    found = _find_call(kwargs)
    if found is None or found[1].tracker is None or found[1].inner:
        return None
    _commit(module, found[1])
    return None


def _commit(module, call: CallState) -> None:
    tracker = call.tracker
    try:
        tracker.commit_if_due()
    except PoolConfigError as exc:  # a user error: say it, do not swallow it
        call.stop()
        if not registry.pool_error_is_not_callers(exc, tracker.pool, tracker.namespace, call.auto):
            raise
    except Exception as exc:  # committing is best effort: the output is already correct
        call.stop()
        if tracker.pool.strict:  # tests, debugging: a failure here is a bug to see, not "no reuse"
            raise
        warn_once(f"writing to the pool failed ({type(exc).__name__}: {exc})")
