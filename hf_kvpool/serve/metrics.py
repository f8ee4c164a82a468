"""``GET /metrics``: the pools' counters in Prometheus text format (``prometheus-client``).

Read from ``pool.stats()`` at scrape time, one series per model (label ``model``): counters
``hf_kvpool_{query,hit}_tokens_total``, ``hf_kvpool_{committed,evicted}_blocks_total``,
``hf_kvpool_{host,remote}_hit_blocks_total``, ``hf_kvpool_remote_errors_total``,
``hf_kvpool_lookups_total``, ``hf_kvpool_checkpoint_hits_total``; gauges ``hf_kvpool_stored_blocks``,
``hf_kvpool_capacity_blocks``, ``hf_kvpool_host_stored_blocks``, ``hf_kvpool_pool_bytes`` (device
storage allocated, checkpoints included), ``hf_kvpool_model_loads`` (loads of the model, reloads
after the idle timeout included). ``hf_kvpool_serve_requests_total{endpoint}`` counts the requests
this server accepted.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .pools import ServePools

__all__ = ["PoolMetrics"]

COUNTERS = {
    "query_tokens": "prompt tokens looked up in the pool",
    "hit_tokens": "prompt tokens served from the pool (not computed)",
    "committed_blocks": "blocks written to the pool",
    "evicted_blocks": "blocks evicted from the device pool",
    "host_hit_blocks": "blocks served from the host-memory tier",
    "remote_hit_blocks": "blocks served from the Redis tier",
    "remote_errors": "failed or timed-out Redis commands",
    "lookups": "prefill look-ups",
    "checkpoint_hits": "rows restored from a recurrent-state checkpoint",
}
GAUGES = {
    "stored_blocks": "blocks held by the device pool",
    "capacity_blocks": "blocks the device pool can hold (0 until its first commit)",
    "host_stored_blocks": "blocks held by the host-memory tier",
}
ENDPOINTS = {
    "ChatCompletionHandler": "chat",
    "CompletionHandler": "completions",
    "ResponseHandler": "responses",
}


class _PoolCollector:
    def __init__(self, pools: ServePools):
        self.pools = pools

    def collect(self):
        pools = self.pools.items()
        stats = [(name, pool.stats()) for name, pool in pools]
        for field, doc in COUNTERS.items():
            family = CounterMetricFamily(f"hf_kvpool_{field}", doc, labels=["model"])
            for name, s in stats:
                family.add_metric([name], getattr(s, field))
            yield family
        for field, doc in GAUGES.items():
            family = GaugeMetricFamily(f"hf_kvpool_{field}", doc, labels=["model"])
            for name, s in stats:
                family.add_metric([name], getattr(s, field))
            yield family
        family = GaugeMetricFamily(
            "hf_kvpool_pool_bytes", "bytes of device pool storage allocated", labels=["model"]
        )
        for name, s in stats:
            family.add_metric([name], s.capacity_bytes + s.checkpoint_bytes)
        yield family
        family = GaugeMetricFamily("hf_kvpool_model_loads", "times the model was loaded", labels=["model"])
        for name, _ in pools:
            family.add_metric([name], self.pools.loads(name))
        yield family


class PoolMetrics:
    """A Prometheus registry of its own (not the process-wide default) over a server's pools."""

    def __init__(self, pools: ServePools):
        self.registry = CollectorRegistry()
        self.registry.register(_PoolCollector(pools))
        self.requests = Counter(
            "hf_kvpool_serve_requests",
            "requests accepted, per endpoint",
            ["endpoint"],
            registry=self.registry,
        )

    def on_request(self, handler: str) -> None:
        self.requests.labels(ENDPOINTS.get(handler, handler)).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def add_route(self, app) -> None:
        """``GET /metrics`` on a FastAPI app."""
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        @app.get("/metrics")
        def metrics():
            return Response(self.text(), media_type=CONTENT_TYPE_LATEST)
