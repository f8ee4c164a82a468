"""What ``enable()`` attaches to a model (kept here, not on the module), and warnings said once.

Also the pool-side view of a model's fingerprints: the namespace of a call (fingerprint, salt,
autocast setting), and freeing the blocks of fingerprints retired by weight updates."""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..core.hashing import namespace_key
from ..core.pool import KVPool
from .fingerprint import ModelFingerprint

__all__ = [
    "ModelState",
    "namespace",
    "other_precision",
    "pool_error_is_not_callers",
    "retire",
    "states",
    "states_lock",
    "warn_once",
]


@dataclass
class ModelState:
    """One enabled model: its default pool, its fingerprint, its cache-layer kinds, and why it
    cannot reuse K/V (if so) with what happens then (``consequence``)."""

    model_ref: weakref.ref
    pool: KVPool
    fingerprint: ModelFingerprint
    kinds: list = field(default_factory=list)  # LayerKind per cache layer
    unsupported: str | None = None
    consequence: str = "this call runs as with DynamicCache (no reuse)"
    single_steps: bool = False  # after a restore, feed one token per forward (see compat)
    auto: bool = False  # generate() without a cache gets a PooledCache (enable(model, auto=True))
    handles: list = field(default_factory=list)
    pools: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # pools its calls used

    @property
    def checkpointed(self) -> bool:
        """Some layer holds state at a token boundary (recurrent, convolution)."""
        return any(kind.checkpointed for kind in self.kinds)

    @property
    def attends(self) -> bool:
        """Some layer reads positions."""
        return any(kind.attends for kind in self.kinds)

    @property
    def pad_invariant(self) -> bool:
        """A left-padded row holds what it holds unpadded (else rows with pads are not pooled)."""
        return all(kind.pad_invariant for kind in self.kinds)

    @property
    def keeps_tokens(self) -> bool:
        """Every layer holds all its tokens' streams (a batch may copy rows from other caches)."""
        return all(kind.keeps_tokens for kind in self.kinds)

    @property
    def model(self) -> torch.nn.Module:
        return self.model_ref()


states: weakref.WeakKeyDictionary[torch.nn.Module, ModelState] = weakref.WeakKeyDictionary()
states_lock = threading.Lock()
_warned: set[str] = set()


def warn_once(reason: str, what: str = "this call runs as with DynamicCache (no reuse)") -> None:
    """Say ``reason`` once per process: ``"hf_kvpool: {reason}; {what}."``"""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"hf_kvpool: {reason}; {what}.", stacklevel=4)


def retire(state: ModelState, pool: KVPool, digests: set[bytes]) -> None:
    """Note that ``state``'s calls use ``pool``; free the blocks of its retired fingerprints
    ``digests`` (weights changed in place: no call can match them again) in every pool its calls
    used, except fingerprints another model on that pool may still compute (a frozen copy)."""
    state.pools.add(pool)
    if not digests:
        return
    with states_lock:
        others = [s for s in states.values() if s is not state]
    for used in list(state.pools):
        kept = set().union(*(o.fingerprint.remembered() for o in others if used in o.pools or o.pool is used))
        dead = {d.hex() for d in digests - kept}
        namespaces = [ns for ns, info in list(used.namespaces.items()) if info.get("model") in dead]
        for ns in namespaces:
            used.namespaces.pop(ns, None)
        used.retire(set(namespaces))


def other_precision(pool: KVPool, namespace: bytes) -> bool:
    """``pool`` holds blocks of the model of ``namespace`` computed under another autocast setting."""
    mine = pool.namespaces.get(namespace, {})
    return any(
        info.get("model") == mine.get("model") and info.get("autocast") != mine.get("autocast")
        for info in list(pool.namespaces.values())
    )


def namespace(pool: KVPool, fingerprint: bytes, salt: str | bytes | None, autocast: str | None) -> bytes:
    # parts are length-prefixed: no salt and an empty salt are different namespaces, and a part
    # count tells autocast ones (fingerprint, marker, autocast[, salt]) from the others
    parts = [fingerprint] if autocast is None else [fingerprint, b"\0autocast", autocast]
    namespace = namespace_key(*parts) if salt is None else namespace_key(*parts, salt)
    if namespace not in pool.namespaces:  # what a snapshot records about its blocks
        shown = salt.hex() if isinstance(salt, bytes) else salt
        info = {"model": fingerprint.hex(), "salt": shown}
        pool.namespaces[namespace] = info if autocast is None else {**info, "autocast": autocast}
    return namespace


def pool_error_is_not_callers(exc: Exception, pool: KVPool, namespace: bytes, auto: bool) -> bool:
    """A PoolConfigError while committing that the caller did not cause: K/V of another autocast
    setting than the pool holds, or a cache auto mode made. Says so once; False: raise it."""
    if other_precision(pool, namespace):
        warn_once(
            "the pool holds this model's K/V computed under another autocast setting, and a pool "
            "serves one layout (dtypes): calls under this one compute without it (give them a pool "
            "of their own: enable(model, pool=KVPool()) or PooledCache(model, pool=...))"
        )
        return True
    if auto:  # the caller never asked for a pooled cache: go on as with DynamicCache
        warn_once(f"the pool cannot take this call's K/V ({exc})")
    return auto
