"""What ``enable()`` attaches to a model (kept here, not on the module), and warnings said once."""

from __future__ import annotations

import threading
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..core.pool import KVPool
from .fingerprint import ModelFingerprint

__all__ = ["ModelState", "states", "states_lock", "warn_once"]


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
    handles: list = field(default_factory=list)

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
