"""One served model version: its ORT session, metadata, and the thread that runs it.

Sessions run off the event loop on the model's own worker thread. A version that is replaced
(hot reload) is retired: requests already holding it finish on it, and its thread stops once
the last of them is done.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from .batching import BatchingConfig, BatchScheduler
from .card import ModelCard
from .dataplane.statistics import ModelStatistics, RunTiming
from .errors import BadRequest
from .metrics import Metrics
from .protocol.datatypes import ORT_TO_V2
from .repository import ModelLoadError, VersionFiles
from .runtime import SessionFactory, provider_of

if TYPE_CHECKING:
    from .drift.analysis import DriftAnalyzer
    from .drift.monitor import LiveMonitor


@dataclass(frozen=True)
class ServingOptions:
    """What every loaded version gets from the service's settings (model.json may override
    the batching part)."""

    factory: SessionFactory
    metrics: Metrics
    batching: BatchingConfig


class LoadedModel:
    def __init__(self, files: VersionFiles, options: ServingOptions) -> None:
        self.name = files.name
        self.version = files.version
        self.files = files
        self.card: ModelCard = files.card
        try:
            self.session: ort.InferenceSession = options.factory.create(files.model_path)
        except Exception as exc:
            raise ModelLoadError(f"ONNX Runtime cannot load model.onnx: {exc}") from exc
        self.provider = provider_of(self.session)
        self.inputs = self.card.inputs
        self.outputs = self.card.outputs
        self.labels = self.card.labels()
        self._check_signature()
        self.output_names = [o.name for o in self.outputs]
        # ORT would also print an error line per refused input (a client's 400): quiet, the
        # exception carries the message.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        # A dynamic first axis on every tensor: requests may carry several samples, and
        # batches of requests can be split back per request.
        self.batch_axis = all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))
        self.executor = ThreadPoolExecutor(
            max(options.batching.workers, 1), thread_name_prefix=f"ort-{self.name}-{self.version}"
        )
        self.batching = self._batching(options.batching)
        self.statistics = ModelStatistics()
        self.scheduler = BatchScheduler(
            self.name, self.run_sync, self.executor, self.batching, options.metrics,
            statistics=self.statistics,
        )  # fmt: skip
        self._users = 0
        self._retired = False
        self._lock = threading.Lock()
        # Typed extensions, set by registry load hooks.
        self.drift: DriftAnalyzer | None = None  # stat-drift (debug endpoints on)
        self.drift_error: str = ""  # why `drift` is None when stat-drift was asked for
        self.monitor: LiveMonitor | None = None  # live drift over served traffic
        self.monitor_error: str = ""  # why `monitor` is None while monitoring is on
        # Called with each request's (tensors, batch size) before it is queued or run; they
        # must not block or modify the tensors (live drift monitor, traffic capture).
        self.observers: list[Callable[[dict[str, np.ndarray], int], None]] = []
        # Called once when this version closes (unloaded or replaced), e.g. to stop its capture.
        self.on_close: list[Callable[[], None]] = []

    def _check_signature(self) -> None:
        """model.json and model.onnx must agree, or requests would be checked against a lie."""
        for kind, cards, metas in (
            ("input", self.inputs, self.session.get_inputs()),
            ("output", self.outputs, self.session.get_outputs()),
        ):
            actual = {m.name: ORT_TO_V2.get(m.type, m.type) for m in metas}
            declared = {c.name: c.datatype for c in cards}
            if actual != declared:
                raise ModelLoadError(
                    f"model.json {kind}s {declared} do not match model.onnx {kind}s {actual}"
                )

    def _batching(self, defaults: BatchingConfig) -> BatchingConfig:
        """The service's defaults, overridden by model.json's `serving` settings."""
        serving = self.card.serving or {}
        try:
            config = BatchingConfig(
                max_batch_size=int(serving.get("max_batch_size", defaults.max_batch_size)),
                max_queue_delay_us=int(
                    serving.get("max_queue_delay_us", defaults.max_queue_delay_us)
                ),
                preferred_batch_sizes=tuple(
                    int(v) for v in serving.get("preferred_batch_sizes", ())
                ),
                max_queue_size=int(serving.get("max_queue_size", defaults.max_queue_size)),
                workers=defaults.workers,
                inline_run_us=int(serving.get("inline_run_us", defaults.inline_run_us)),
            )
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"model.json serving settings are invalid: {exc}") from None
        if config.enabled and not self.batch_axis:  # outputs could not be split per request
            return BatchingConfig(
                max_queue_size=config.max_queue_size,
                workers=config.workers,
                inline_run_us=config.inline_run_us,
            )
        return config

    def run_sync(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self.session.run(self.output_names, tensors, self._run_options)
        except InvalidArgument as exc:  # inputs ORT refuses (a size the model cannot take)
            raise BadRequest(f"model '{self.name}' cannot run these inputs: {exc}") from None
        return dict(zip(self.output_names, results, strict=True))

    async def run(
        self, tensors: dict[str, np.ndarray], size: int, timing: RunTiming | None = None
    ) -> dict[str, np.ndarray]:
        """Through the model's bounded queue (and dynamic batching where configured)."""
        for observe in self.observers:
            observe(tensors, size)
        return await self.scheduler.submit(tensors, size, timing)

    def run_inline(
        self, tensors: dict[str, np.ndarray], size: int, timing: RunTiming | None = None
    ) -> dict[str, np.ndarray] | None:
        """The outputs of a tiny model's run done at once on the event loop, or None when the
        request must go through `run` (see BatchScheduler.can_run_inline). Observers see the
        request before it runs, as in `run`, whether or not the run succeeds."""
        scheduler = self.scheduler
        if not scheduler.can_run_inline(size):
            return None
        for observe in self.observers:
            observe(tensors, size)
        return scheduler.run_inline(tensors, size, timing)

    def use(self) -> _InUse:
        """Hold this version for one request (`with model.use():`); a retired version closes
        after its last user."""
        return _InUse(self)

    def _enter(self) -> None:
        with self._lock:
            self._users += 1

    def _exit(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._retired and self._users == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._users == 0
        if close:
            self._close()

    def _close(self) -> None:
        self.scheduler.close()
        self.executor.shutdown(wait=False)
        if self.drift is not None:
            self.drift.close()
        if self.monitor is not None:
            self.monitor.close()
        for closer in self.on_close:
            closer()


class _InUse:
    """`LoadedModel.use()`: a plain context manager, not a generator one (a request pays it
    on every call)."""

    __slots__ = ("model",)

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def __enter__(self) -> LoadedModel:
        self.model._enter()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model._exit()
