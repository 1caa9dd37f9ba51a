"""Back-pressure of the two request observers, in process with real sessions and files: when
their background thread falls behind (held here by taking its lock), the request path neither
waits nor grows memory beyond the queue's bound; the excess is dropped and counted, and what was
queued is processed once the thread runs again."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from torch_models import export_small

from service.batching import BatchingConfig
from service.capture import CaptureService, CaptureStartRequest
from service.capture import writer as capture_writer
from service.config import Settings
from service.drift import monitor as monitor_module
from service.drift.analysis import Thresholds
from service.drift.live_metrics import DriftMetrics
from service.drift.monitor import LiveMonitor, MonitorConfig
from service.metrics import Metrics
from service.model import LoadedModel, ServingOptions
from service.repository import ModelRepository
from service.runtime import SessionFactory


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    repo = tmp_path_factory.mktemp("backpressure")
    export_small(repo)
    factory = SessionFactory("cpu", 0, 1)
    loaded = LoadedModel(
        ModelRepository(repo).read("small", 1), ServingOptions(factory, Metrics(), BatchingConfig())
    )
    yield loaded
    loaded.retire()


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_a_stalled_monitor_drops_and_counts_instead_of_queueing_without_bound(model):
    config = MonitorConfig(1.0, 0.0, 3600.0, 2, Thresholds(0.25, 0.5))
    monitor = LiveMonitor(model, SessionFactory("cpu"), config, DriftMetrics(CollectorRegistry()))
    try:
        x = np.ones((4, 3, 32, 32), np.float32)  # 48 KiB a request
        fits = monitor_module.MAX_QUEUED_BYTES // x.nbytes
        with monitor._wake:  # the monitor thread cannot take anything now
            started = time.perf_counter()
            for _ in range(fits + 25):
                monitor.offer({"x": x}, 4)
            elapsed = time.perf_counter() - started
            assert monitor.dropped == 25
            assert monitor.queued_bytes <= monitor_module.MAX_QUEUED_BYTES
        assert elapsed / (fits + 25) < 1e-3  # microseconds per offer, never a wait
        wait_until(lambda: monitor.windows.snapshot()[0].samples == 4 * fits)
        assert monitor.windows.snapshot()[0].requests == fits
        assert monitor.status().dropped_requests == 25
        assert monitor.status().pending_samples == 0
    finally:
        monitor.close()


def test_a_stalled_capture_writer_drops_and_counts(model, tmp_path, monkeypatch):
    monkeypatch.setattr(capture_writer, "MAX_QUEUED_BYTES", 10 * 12 * 1024)  # 10 samples
    service = CaptureService(Settings(capture_dir=tmp_path, repository=tmp_path))
    service.start(model, CaptureStartRequest())
    capture = service.last("small")
    x = np.ones((2, 3, 32, 32), np.float32)
    with capture._wake:  # the writer cannot take anything: a disk that does not answer
        for _ in range(8):
            capture.offer({"x": x}, 2)
        assert capture.dropped == 6  # 5 requests fit the queue
    service.stop("small").wait(10)
    status = capture.status()
    assert status.samples == 10
    assert status.dropped_samples == 6
    assert status.stop_reason == "stopped through the API"
    stored = np.load(tmp_path / "small" / "1" / status.capture_id / "shard-00000.x.npy")
    assert stored.shape == (10, 3, 32, 32)
