"""hf-kvpool: a drop-in DynamicCache that reuses K/V of shared prompt prefixes across generate() calls."""

from .cache import PooledCache
from .integration import enable, get_pool, weights_changed
from .pool import KVPool, PoolStats

__all__ = ["PooledCache", "KVPool", "PoolStats", "enable", "get_pool", "weights_changed"]
__version__ = "0.1.0"
