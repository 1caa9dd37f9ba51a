"""Live drift monitoring of one served model version, off the request's critical path.

A request is sampled (share BNSERVE_DRIFT_SAMPLE_RATE, capped at BNSERVE_DRIFT_MAX_SAMPLES_PER_S
samples per second) by a few arithmetic operations on the event loop, and handed, by reference
and unchanged, to a bounded queue. A daemon thread at the lowest CPU priority (nice 19) runs
the live statistics graph on it with a one-thread ONNX Runtime session and merges the
per-channel moments into the current window. When the queue is full the sample is dropped and
counted, so the serving path never waits; the served session and its outputs are untouched.
The monitor's CPU is bounded by BNSERVE_DRIFT_MAX_CPU (a share of one core, CpuBudget): over
it, samples are skipped and counted, so its cost stays bounded however heavy the traffic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import NotFound
from ..protocol.datatypes import numpy_dtype
from ..runtime import SessionFactory
from .analysis import Thresholds
from .graph import DriftGraphError
from .live import Moments, WindowedStatistics
from .live_graph import build_statistics_graph
from .live_metrics import DriftMetrics
from .live_report import LayerReference, window_report
from .live_schemas import LiveDriftResponse, LiveMonitorStatus, LiveWindow

log = logging.getLogger("bnserve.drift.live")
MAX_QUEUED_BYTES = 8 * 1024 * 1024  # bounded memory: sampled inputs waiting for the thread
# One sample per statistics run: every run has the one shape the warm-up sized the session's
# memory arena for at load, so the monitor's memory does not grow while serving.
MAX_RUN_SAMPLES = 1
GAUGE_INTERVAL = 1.0  # seconds between Prometheus gauge refreshes
CPU_BURST_SECONDS = 10.0  # the CPU budget may bank this many seconds' worth of its share


@dataclass(frozen=True)
class MonitorConfig:
    sample_rate: float
    max_samples_per_s: float  # 0 = no cap
    window_seconds: float
    history: int
    thresholds: Thresholds
    max_cpu: float = 0.0  # share of one core; 0 = unbounded


class CpuBudget:
    """A token bucket of CPU seconds: `share` of a second accrues per wall-clock second, up
    to CPU_BURST_SECONDS' worth, and every monitor run spends its measured thread time. While
    the balance is not positive the monitor skips samples, so over any span of T seconds it
    uses at most share * (T + CPU_BURST_SECONDS) plus one run. share 0: unbounded."""

    def __init__(self, share: float, clock=time.monotonic) -> None:
        self.share, self.clock = share, clock
        self.balance, self.last = share * CPU_BURST_SECONDS, clock()

    def spend(self, seconds: float) -> None:
        self.balance -= seconds

    def allows(self) -> bool:
        if self.share <= 0:
            return True
        now = self.clock()
        refill = (now - self.last) * self.share
        self.balance = min(self.share * CPU_BURST_SECONDS, self.balance + refill)
        self.last = now
        return self.balance > 0


class Sampler:
    """Bernoulli(rate) per request, then a token bucket of max_samples_per_s (burst: one
    second's worth) that may keep only the first samples of a large request."""

    def __init__(self, rate: float, max_per_s: float, clock=time.monotonic) -> None:
        self.rate, self.max_per_s, self.clock = rate, max_per_s, clock
        self.tokens, self.last = max(max_per_s, 1.0), clock()
        self.random = random.Random(0x5EED).random

    def take(self, size: int) -> int:
        """How many of a request's `size` samples to monitor (0: none)."""
        if self.rate <= 0 or (self.rate < 1 and self.random() >= self.rate):
            return 0
        if self.max_per_s <= 0:
            return size
        now = self.clock()
        burst = max(self.max_per_s, 1.0)
        self.tokens = min(burst, self.tokens + (now - self.last) * self.max_per_s)
        self.last = now
        take = min(size, int(self.tokens))
        self.tokens -= take
        return take


class LiveMonitor:
    def __init__(
        self, model, factory: SessionFactory, config: MonitorConfig, metrics: DriftMetrics
    ) -> None:
        self.name, self.version = model.name, str(model.version)
        self.config = config
        self.metrics = metrics.bind(self.name, self.version)
        reference = onnx.load(str(model.files.reference_path))
        names = {b.onnx_node: b.name for b in model.card.batch_norm if b.onnx_node}
        graph = build_statistics_graph(reference, names)
        if not graph.layers:
            raise DriftGraphError("the model has no BatchNorm layers to monitor")
        # One intra-op thread: a run stays on the monitor's low-priority thread. The session
        # keeps ONNX Runtime's memory arena, which the warm-up sizes at load for a run of
        # MAX_RUN_SAMPLES; later runs reuse it. (Without the arena every run mallocs and frees
        # its activations and the C allocator keeps and regrows them unpredictably: the
        # server's RSS moved by up to +50 MiB between snapshots at 10x the default rate.)
        sessions = SessionFactory(factory.providers, factory.device_id, intra_op_threads=1)
        self.session = sessions.create(graph.model.SerializeToString())
        self.layers = graph.layers
        self.references: list[LayerReference] | None = None
        self.windows = WindowedStatistics(
            [layer.channels for layer in graph.layers], config.window_seconds, config.history
        )
        self.sampler = Sampler(config.sample_rate, config.max_samples_per_s)
        self.budget = CpuBudget(config.max_cpu)
        self.over_budget = False  # set by the monitor thread, read on the request path
        self.queue: deque[tuple[dict[str, np.ndarray], int]] = deque()
        self.queued_samples = self.queued_bytes = 0
        self.sampled = self.dropped = 0
        self.skipped = self.skipped_queued = 0  # over the CPU budget: on the loop / the thread
        self.seconds = 0.0
        self._wake = threading.Condition()
        self._closed = False
        warmed: list[BaseException | None] = []
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._work,
            args=(model.inputs, warmed, ready),
            name=f"drift-{self.name}-{self.version}",
            daemon=True,
        )
        self._thread.start()
        ready.wait()
        if warmed[0] is not None:
            raise warmed[0]

    # -- the request path: O(1), never blocks on the monitor --------------------------------
    def offer(self, tensors: dict[str, np.ndarray], size: int) -> None:
        try:
            self._offer(tensors, size)
        except Exception:  # monitoring must never fail a request
            log.exception("live drift: sampling failed for %s", self.name)

    def _offer(self, tensors: dict[str, np.ndarray], size: int) -> None:
        take = self.sampler.take(size)
        if take <= 0:
            return
        self.sampled += 1
        self.metrics.sampled.inc()
        if self.over_budget:
            self.skipped += 1
            self.metrics.skipped.inc()
            return
        if take < size:
            tensors = {k: v[:take] for k, v in tensors.items()}
        nbytes = sum(t.nbytes for t in tensors.values())
        if self.queued_bytes + nbytes > MAX_QUEUED_BYTES or self._closed:
            self.dropped += 1
            self.metrics.dropped.inc()
            return
        with self._wake:
            self.queue.append((tensors, take))
            self.queued_samples += take
            self.queued_bytes += nbytes
            self._wake.notify()

    # -- the monitor thread ------------------------------------------------------------------
    def _work(self, inputs, warmed: list, ready: threading.Event) -> None:
        with contextlib.suppress(OSError, AttributeError):  # lowest priority for this thread
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        try:
            # On this thread: its malloc arena is where later runs allocate, so their memory
            # is reserved at load, not grown while serving.
            self._warm_up(inputs)
            warmed.append(None)
        except BaseException as exc:  # reported by the constructor: the load hook says why
            warmed.append(exc)
            return
        finally:
            ready.set()
        last_gauges = 0.0
        while True:
            with self._wake:
                if not self.queue and not self._closed:
                    self._wake.wait(GAUGE_INTERVAL)
                if self._closed:
                    return
                batch = self._take()
            if batch and not self.budget.allows():
                self.skipped_queued += len(batch)  # queued before the budget ran out
                self.metrics.skipped.inc(len(batch))
            elif batch:
                started = time.thread_time()
                try:
                    self._merge(batch)
                except Exception:  # a sample the graph cannot run must not stop monitoring
                    log.exception("live drift: statistics run failed for %s", self.name)
                self._spent(time.thread_time() - started)
            if time.monotonic() - last_gauges >= GAUGE_INTERVAL:
                last_gauges = time.monotonic()
                started = time.thread_time()
                self._update_gauges()
                self._spent(time.thread_time() - started)
            self.over_budget = not self.budget.allows()

    def _spent(self, seconds: float) -> None:
        self.seconds += seconds
        self.metrics.seconds.inc(seconds)
        self.budget.spend(seconds)

    def _take(self) -> list[tuple[dict[str, np.ndarray], int]]:
        """Queued requests of one shape, up to MAX_RUN_SAMPLES samples (at least one)."""
        if not self.queue:
            return []
        first = self.queue.popleft()
        batch, samples = [first], first[1]
        signature = _signature(first[0])
        while self.queue and samples + self.queue[0][1] <= MAX_RUN_SAMPLES:
            if _signature(self.queue[0][0]) != signature:
                break
            item = self.queue.popleft()
            batch.append(item)
            samples += item[1]
        self.queued_samples -= samples
        self.queued_bytes -= sum(t.nbytes for item in batch for t in item[0].values())
        return batch

    def _merge(self, batch: list[tuple[dict[str, np.ndarray], int]]) -> None:
        tensors = (
            batch[0][0]
            if len(batch) == 1
            else {k: np.concatenate([t[k] for t, _ in batch]) for k in batch[0][0]}
        )
        samples = sum(size for _, size in batch)
        if self.references is None:
            self._learn_references({k: v[:1] for k, v in tensors.items()})
        pooled = [Moments.empty(layer.channels) for layer in self.layers]
        # Runs of at most MAX_RUN_SAMPLES: the activations a run allocates stay bounded.
        for start in range(0, samples, MAX_RUN_SAMPLES):
            chunk = {k: v[start : start + MAX_RUN_SAMPLES] for k, v in tensors.items()}
            size = min(MAX_RUN_SAMPLES, samples - start)
            for acc, moments in zip(pooled, self._moments(chunk, size), strict=True):
                acc.merge(moments)
        self.windows.add(pooled, samples, len(batch))

    def _moments(self, tensors: dict[str, np.ndarray], samples: int) -> list[Moments]:
        names = [self._tap(layer, w) for layer in self.layers for w in ("mean", "var", "shape")]
        outputs = dict(zip(names, self.session.run(names, tensors), strict=True))
        per_layer = []
        for layer, ref in zip(self.layers, self.references, strict=True):
            shape = outputs[self._tap(layer, "shape")]
            count = int(np.prod(shape, dtype=np.int64)) // max(layer.channels, 1)
            ref.values_per_sample = count // max(samples, 1)
            per_layer.append(
                Moments.of_batch(
                    count, outputs[self._tap(layer, "mean")], outputs[self._tap(layer, "var")]
                )
            )
        return per_layer

    def _warm_up(self, inputs) -> None:
        """Runs on zeros at load, at the run size: proves the graph runs, reads the stored
        statistics, and sizes the session's arena, so the runs' memory is made at load."""
        shapes = {i.name: i.shape for i in inputs}
        if any(d < 0 for shape in shapes.values() for d in shape[1:]):
            return  # dynamic sizes: the first sampled request does this
        for size in sorted({1, MAX_RUN_SAMPLES}):
            tensors = {
                i.name: np.zeros([size, *i.shape[1:]], numpy_dtype(i.datatype)) for i in inputs
            }
            if self.references is None:
                self._learn_references(tensors)
            self._moments(tensors, size)

    def _learn_references(self, tensors: dict[str, np.ndarray]) -> None:
        stored = ("running_mean", "running_var")
        names = [self._tap(layer, w) for layer in self.layers for w in stored]
        values = self.session.run(names, tensors)
        self.references = [
            LayerReference(
                layer, values[2 * i].astype(np.float64), values[2 * i + 1].astype(np.float64)
            )
            for i, layer in enumerate(self.layers)
        ]

    @staticmethod
    def _tap(layer, what: str) -> str:
        return layer.tap(what)

    def _update_gauges(self) -> None:
        if self.references is None:
            return
        current, history = self.windows.snapshot()
        report = window_report(
            current, self.references, self.config.thresholds, current=True, with_values=False
        )
        if report.summary.verdict == "insufficient" and history:
            report = window_report(
                history[-1], self.references, self.config.thresholds,
                current=False, with_values=False,
            )  # fmt: skip
        self.metrics.publish(report)

    # -- reading -----------------------------------------------------------------------------
    def report(self, *, with_values: bool) -> LiveDriftResponse:
        current, history = self.windows.snapshot()
        return LiveDriftResponse(
            model_name=self.name,
            model_version=self.version,
            monitor=self.status(),
            current=self._window(current, current=True, with_values=with_values),
            history=[self._window(w, current=False, with_values=with_values) for w in history],
        )

    def _window(self, window, *, current: bool, with_values: bool) -> LiveWindow:
        references = self.references or [
            LayerReference(layer, np.zeros(layer.channels), np.ones(layer.channels))
            for layer in self.layers
        ]  # before the first sample every window is empty: insufficient, never compared
        return window_report(
            window, references, self.config.thresholds, current=current, with_values=with_values
        )

    def status(self) -> LiveMonitorStatus:
        return LiveMonitorStatus(
            sample_rate=self.config.sample_rate,
            max_samples_per_s=self.config.max_samples_per_s,
            window_seconds=self.config.window_seconds,
            history_windows=self.config.history,
            sampled_requests=self.sampled,
            dropped_requests=self.dropped,
            max_cpu=self.config.max_cpu,
            skipped_requests=self.skipped + self.skipped_queued,
            pending_samples=self.queued_samples,
            monitor_seconds=self.seconds,
        )

    def reset(self) -> float:
        """Start a new window now; returns its start (wall-clock seconds)."""
        self.windows.reset()
        return self.windows.current.start

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self.queue.clear()
            self.queued_samples = self.queued_bytes = 0
            self._wake.notify()
        self.metrics.remove()


def _signature(tensors: dict[str, np.ndarray]) -> tuple:
    return tuple((k, v.shape[1:], v.dtype.str) for k, v in sorted(tensors.items()))


def attach_monitor(factory: SessionFactory, config: MonitorConfig, metrics: DriftMetrics):
    """A registry load hook: each loaded version gets its monitor, fed by its observers."""

    def attach(model) -> None:
        if config.sample_rate <= 0:
            return
        try:
            monitor = LiveMonitor(model, factory, config, metrics)
        except Exception as exc:  # an add-on: the version serves without it, and says why
            model.monitor_error = str(exc)
            log.warning("live drift unavailable for %s v%s: %s", model.name, model.version, exc)
            return
        model.monitor = monitor
        model.observers.append(monitor.offer)

    return attach


def monitor_of(model) -> LiveMonitor:
    monitor = model.monitor
    if monitor is None:
        reason = model.monitor_error or "monitoring is off (BNSERVE_DRIFT_SAMPLE_RATE=0)"
        raise NotFound(f"live drift is not available for model '{model.name}': {reason}")
    return monitor
