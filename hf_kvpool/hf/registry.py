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
    """One enabled model: its default pool, its fingerprint, and why it cannot reuse K/V (if so)."""

    model_ref: weakref.ref
    pool: KVPool
    fingerprint: ModelFingerprint
    unsupported: str | None = None
    handles: list = field(default_factory=list)

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
