"""Prometheus metrics, on a registry of the app's own (several apps can live in one process)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as _Counter
from prometheus_client import Histogram as _Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .bookkeeping import Bookkeeping
from .logs import dropped_records

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MODEL_STATES = ("READY", "LOADING", "UNAVAILABLE")


class _CachedLabels:
    """`labels(...)` by one dict lookup for label values seen before. prometheus_client's own
    labels() validates, converts to str and takes a lock on every call: on the request path,
    twice per request, that is most of the metrics' cost. Same children, same series."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[tuple, object] = {}

    def labels(self, *values, **by_name):
        if by_name:
            return super().labels(**by_name)
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = super().labels(*values)
        return child

    def remove(self, *values) -> None:
        self._children.clear()
        super().remove(*values)

    def remove_by_labels(self, labels: dict[str, str]) -> None:
        self._children.clear()
        super().remove_by_labels(labels)

    def clear(self) -> None:
        self._children.clear()
        super().clear()


class Counter(_CachedLabels, _Counter):
    pass


class Histogram(_CachedLabels, _Histogram):
    pass


class LogDrops(Collector):
    """Log records the background writer could not take (queue full) or write (sink broken)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "bnserve_log_records_dropped",
            "Log records dropped instead of blocking requests (log queue full or sink broken)",
            value=dropped_records(),
        )


class _Flush(Collector):
    """Registered first: a scrape flushes the deferred bookkeeping before reading any series."""

    def __init__(self, later: Bookkeeping) -> None:
        self.later = later

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        self.later.flush()
        return iter(())


class Metrics:
    def __init__(self) -> None:
        self.later = Bookkeeping()  # per-request figures, recorded after the answer is sent
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_Flush(self.later))
        self.requests = Counter(
            "bnserve_requests_total", "Requests by endpoint, model and status code",
            ["endpoint", "model", "code"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "bnserve_request_failures_total", "Failed requests by model and reason",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "bnserve_rejected_requests_total",
            "Requests refused before running (queue_full, concurrency, timeout, too_large)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "bnserve_request_duration_seconds", "End-to-end request latency in the server",
            ["endpoint", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "bnserve_queue_duration_seconds", "Time a request waits before its batch runs",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_time = Histogram(
            "bnserve_compute_duration_seconds", "ONNX Runtime session.run time per batch",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "bnserve_batch_size", "Samples per executed batch", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_batch_size = Histogram(
            "bnserve_request_batch_size", "Samples per successful request", ["model"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(LogDrops())
        self.in_flight = Gauge("bnserve_requests_in_flight", "Requests being handled", registry=r)
        self.model_state = Gauge(
            "bnserve_model_state",
            "1 for the state each model version is in (READY, LOADING, UNAVAILABLE)",
            ["model", "version", "state"], registry=r,
        )  # fmt: skip

    def set_model_state(self, model: str, version: int, state: str) -> None:
        """Record a version's state; RETIRED (replaced or unloaded) drops its series."""
        for known in MODEL_STATES:
            if state == "RETIRED":
                with contextlib.suppress(KeyError):
                    self.model_state.remove(model, str(version), known)
            else:
                self.model_state.labels(model, str(version), known).set(int(state == known))
