"""hf-kvpool: a drop-in DynamicCache that reuses K/V of shared prompt prefixes across generate() calls.

``hf_kvpool.core`` is the pool (no transformers in it); ``hf_kvpool.hf`` meets transformers and is
imported on first use of one of its names, so a process that only moves pool blocks (a snapshot
tool, a Redis warmer) never imports transformers.
"""

from __future__ import annotations

import importlib

from .core.pool import KVPool, LayoutMismatchError, PoolConfigError, PoolStats, register_fingerprint_reader
from .core.snapshot import SnapshotError

__all__ = [
    "PooledCache",
    "KVPool",
    "PoolStats",
    "PoolConfigError",
    "LayoutMismatchError",
    "SnapshotError",
    "enable",
    "get_pool",
    "weights_changed",
]
__version__ = "0.1.0"

_FROM_HF = {
    "PooledCache": "hf_kvpool.hf.cache",
    "enable": "hf_kvpool.hf.enable",
    "get_pool": "hf_kvpool.hf.enable",
    "weights_changed": "hf_kvpool.hf.enable",
}


def __getattr__(name: str):
    if name in _FROM_HF:
        value = getattr(importlib.import_module(_FROM_HF[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_kvpool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _fingerprint_hex(model) -> str:
    """How ``KVPool.load(model=...)`` reads a model's fingerprint (the core cannot import hf)."""
    from .hf.attach import attach

    return attach(model).fingerprint.digest().hex()


register_fingerprint_reader(_fingerprint_hex)
