"""What ``enable()`` attaches to a model (kept here, not on the module), and warnings said once."""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..core.pool import KVPool
from .fingerprint import ModelFingerprint

__all__ = ["ModelState", "other_precision", "retire", "states", "states_lock", "warn_once"]


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
        if namespaces:
            used.retire(namespaces)


def other_precision(pool: KVPool, namespace: bytes) -> bool:
    """``pool`` holds blocks of the model of ``namespace`` computed under another autocast setting."""
    mine = pool.namespaces.get(namespace, {})
    return any(
        info.get("model") == mine.get("model") and info.get("autocast") != mine.get("autocast")
        for info in list(pool.namespaces.values())
    )
