"""``python -m hf_kvpool.serve MODEL``: ``transformers serve`` with the pool on every model it loads.

The server is transformers' own (``transformers.cli.serve.Serve``: OpenAI-compatible chat,
completions and responses endpoints); this package only hooks into it (``seams.py`` lists every
private transformers name it relies on):

- every model the server loads, and loads again after its idle timeout, is ``hf_kvpool.enable``d
  with one pool per model name (``pools.py``), so each ``generate()`` without a cache reuses the
  prefixes earlier requests left in the pool;
- ``GET /metrics`` reports the pools' counters in Prometheus text format (``metrics.py``);
- the fields cache-aware routers add to every request (``stream_reasoning``, ``ignore_eos``...) are
  accepted instead of answered with HTTP 422 (``fields.py``).
"""

from __future__ import annotations

from .pools import PoolOptions, ServePools

__all__ = ["PoolOptions", "ServePools"]
