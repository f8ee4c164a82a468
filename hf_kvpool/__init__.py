"""hf-kvpool: a drop-in DynamicCache that reuses K/V of shared prompt prefixes across generate() calls."""

from .cache import PooledCache
from .integration import enable, get_pool, weights_changed
from .pool import KVPool, PoolConfigError, PoolStats
from .snapshot import SnapshotError

__all__ = [
    "PooledCache",
    "KVPool",
    "PoolStats",
    "PoolConfigError",
    "SnapshotError",
    "enable",
    "get_pool",
    "weights_changed",
]
__version__ = "0.1.0"
