"""One :class:`~hf_kvpool.KVPool` per model name the server loads, kept across reloads.

``transformers serve`` unloads an idle model after ``--model-timeout`` seconds and loads it again on
the next request: the new model object is enabled with the same pool, so its blocks (keyed by a
fingerprint of the weights, which a reload does not change) serve the requests after the reload.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ..core.pool import KVPool

__all__ = ["PoolOptions", "ServePools", "log_once", "logger"]

logger = logging.getLogger("hf_kvpool.serve")
_said: set[str] = set()
_said_lock = threading.Lock()


def log_once(message: str) -> None:
    """Log ``message`` (a warning) the first time only."""
    with _said_lock:
        if message in _said:
            return
        _said.add(message)
    logger.warning("%s", message)


@dataclass(frozen=True)
class PoolOptions:
    """How each model's pool is made (``KVPool``'s arguments)."""

    capacity_bytes: int | None = None
    host_capacity_bytes: int = 0
    remote: str | None = None
    block_size: int = 16

    def make_pool(self) -> KVPool:
        return KVPool(
            capacity_bytes=self.capacity_bytes,
            block_size=self.block_size,
            host_capacity_bytes=self.host_capacity_bytes,
            remote=self.remote,
        )


class ServePools:
    """The pools of one server: ``name -> KVPool``, made on a model's first load."""

    def __init__(self, options: PoolOptions | None = None):
        self.options = options or PoolOptions()
        self._pools: dict[str, KVPool] = {}
        self._loads: dict[str, int] = {}
        self._lock = threading.Lock()

    def pool_for(self, name: str) -> KVPool:
        with self._lock:
            pool = self._pools.get(name)
            if pool is None:
                pool = self._pools[name] = self.options.make_pool()
            return pool

    def enable(self, model, name: str):
        """Enable ``model`` (just loaded under ``name``) with that name's pool; returns the model.

        A model the pool cannot serve is still served (as plain transformers serve would), and the
        log says why once.
        """
        from ..hf.enable import enable, model_state  # transformers only from here on

        pool = self.pool_for(name)
        try:
            enable(model, pool=pool)
        except Exception as exc:  # never stop a model from being served
            log_once(f"{name}: the pool cannot serve this model ({type(exc).__name__}: {exc}); no reuse")
            return model
        with self._lock:
            self._loads[name] = self._loads.get(name, 0) + 1
            loads = self._loads[name]
        unsupported = model_state(model).unsupported
        if unsupported:
            log_once(f"{name}: {unsupported}; its requests run without the pool")
        else:
            again = f" (load {loads}: the pool kept its blocks)" if loads > 1 else ""
            logger.warning("pool enabled for %s%s", name, again)
        return model

    def items(self) -> list[tuple[str, KVPool]]:
        with self._lock:
            return sorted(self._pools.items())

    def loads(self, name: str) -> int:
        with self._lock:
            return self._loads.get(name, 0)
