"""Prometheus series of live drift monitoring, on the app's metrics registry.

Cardinality: bnserve_drift_layer_score has one series per served model version and BatchNorm
layer (ResNet-18: 20 per version); the others one per served version. A retired version's
series are removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from .live_schemas import LiveWindow

VERDICT_CODES = {"insufficient": -1, "ok": 0, "warn": 1, "drift": 2}


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = self.registry = registry
        self.score = Gauge(
            "bnserve_drift_layer_score",
            "Live BatchNorm drift score (Gaussian W2 in running stds, channel mean) of the "
            "latest judged window",
            ["model", "version", "layer"], registry=r,
        )  # fmt: skip
        self.verdict = Gauge(
            "bnserve_drift_verdict",
            "Live drift verdict of the latest judged window: -1 insufficient, 0 ok, 1 warn, "
            "2 drift",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.sampled = Counter(
            "bnserve_drift_sampled_requests_total", "Requests sampled for live drift",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "bnserve_drift_dropped_requests_total",
            "Sampled requests dropped because the monitor's queue was full",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.skipped = Counter(
            "bnserve_drift_skipped_requests_total",
            "Sampled requests skipped because the monitor was over its CPU budget "
            "(BNSERVE_DRIFT_MAX_CPU)",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.seconds = Counter(
            "bnserve_drift_monitor_seconds_total",
            "Thread CPU seconds spent computing live drift statistics",
            ["model", "version"], registry=r,
        )  # fmt: skip

    def bind(self, model: str, version: str) -> BoundDriftMetrics:
        return BoundDriftMetrics(self, model, version)


@dataclass
class BoundDriftMetrics:
    parent: DriftMetrics
    model: str
    version: str

    def __post_init__(self) -> None:
        labels = (self.model, self.version)
        self.sampled = self.parent.sampled.labels(*labels)
        self.dropped = self.parent.dropped.labels(*labels)
        self.skipped = self.parent.skipped.labels(*labels)
        self.seconds = self.parent.seconds.labels(*labels)
        self.layers: set[str] = set()

    def publish(self, window: LiveWindow) -> None:
        self.parent.verdict.labels(self.model, self.version).set(
            VERDICT_CODES[window.summary.verdict]
        )
        for layer in window.layers:
            if layer.score is None:
                with contextlib.suppress(KeyError):
                    self.parent.score.remove(self.model, self.version, layer.name)
                continue
            self.parent.score.labels(self.model, self.version, layer.name).set(layer.score)
            self.layers.add(layer.name)

    def remove(self) -> None:
        labels = (self.model, self.version)
        p = self.parent
        for metric in (p.verdict, p.sampled, p.dropped, p.skipped, p.seconds):
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        for layer in self.layers:
            with contextlib.suppress(KeyError):
                self.parent.score.remove(*labels, layer)
