"""Prometheus metrics for one proxy, in a registry of its own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Loopback upstream calls take well under a millisecond; real clouds tens to
# hundreds; streams minutes.  Buckets cover all three.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class Metrics:
    """Counters and the latency histogram the proxy updates."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        requests = Counter(
            "sidecar_requests", "Requests answered, by status class.", ["status_class"], registry=self.registry
        )
        # Children resolved once: label lookup is the slow part of inc().
        self._by_class = {name: requests.labels(name) for name in _STATUS_CLASSES}
        self._latency = Histogram(
            "sidecar_upstream_latency_seconds",
            "Time to the upstream's response headers.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        refreshes = Counter(
            "sidecar_refreshes", "Refresh calls to the token endpoint, by outcome.", ["outcome"], registry=self.registry
        )
        self._refreshes = {name: refreshes.labels(name) for name in ("ok", "dead", "transient")}
        self._relogins = Counter(
            "sidecar_relogin_responses", "Re-login responses sent to clients.", registry=self.registry
        )
        self._retries = Counter("sidecar_retries", "Requests retried after an upstream 401.", registry=self.registry)

    def request(self, status: int, upstream_seconds: float | None, retried: bool, relogin: bool) -> None:
        klass = self._by_class.get(f"{status // 100}xx")
        if klass is not None:
            klass.inc()
        if upstream_seconds is not None:
            self._latency.observe(upstream_seconds)
        if retried:
            self._retries.inc()
        if relogin:
            self._relogins.inc()

    def refresh(self, outcome: str) -> None:
        counter = self._refreshes.get(outcome)
        if counter is not None:
            counter.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
