"""Wiring of the per-version live extensions (live drift monitor, traffic capture): the
registry load hooks and the capture service the data plane holds."""

from __future__ import annotations

from .capture import CaptureService
from .config import Settings
from .drift.analysis import Thresholds
from .drift.live_metrics import DriftMetrics
from .drift.monitor import MonitorConfig, attach_monitor
from .metrics import Metrics
from .runtime import SessionFactory


def live_hooks(
    settings: Settings, factory: SessionFactory, metrics: Metrics
) -> tuple[list, CaptureService]:
    """(load hooks, capture service). Raises CaptureDirError for an unusable folder."""
    config = MonitorConfig(
        sample_rate=settings.drift_sample_rate,
        max_samples_per_s=settings.drift_max_samples_per_s,
        window_seconds=settings.drift_window,
        history=settings.drift_history,
        thresholds=Thresholds(warn=settings.drift_warn, drift=settings.drift_alert),
        max_cpu=settings.drift_max_cpu,
    )
    capture = CaptureService(settings)
    hooks = [attach_monitor(factory, config, DriftMetrics(metrics.registry)), capture.attach]
    return hooks, capture


def close_live(services) -> None:
    """At shutdown: running captures write their last shard and manifest."""
    if services.capture is not None:
        services.capture.close()
