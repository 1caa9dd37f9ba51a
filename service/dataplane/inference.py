"""Inference on the data plane: a typed request in, a typed response out, no protocol in sight.

Order of checks: the model (404/503), then the request against the model's signature (400),
then admission (503 when too many requests are in flight or the model's queue is full), then
the run (504 past the timeout). Every outcome lands in the model's Triton statistics.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from ..config import Settings
from ..errors import BadRequest, GatewayTimeout, ServiceError, Unavailable
from ..metrics import Metrics
from ..model import LoadedModel
from ..registry import ModelRegistry
from .statistics import RunTiming
from .types import InferRequest, InferResponse, OutputTensor, ValidatedRequest
from .validation import validate


class InferenceService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        # Each element takes at least one byte of body, binary or JSON.
        self.max_elements = settings.max_request_bytes

    def validate(self, model: LoadedModel, request: InferRequest) -> ValidatedRequest:
        return validate(
            request,
            model.inputs,
            model.outputs,
            max_elements=self.max_elements,
            reject_nonfinite=self.settings.reject_nonfinite,
        )

    async def infer(self, request: InferRequest) -> InferResponse:
        call, response = self._start(request)
        if response is not None:
            return response
        try:
            return await self._queued(call)
        finally:
            call.release()

    def infer_now(self, request: InferRequest) -> InferResponse | asyncio.Future[InferResponse]:
        """`infer` for a caller that is not a coroutine: the response at once when the model
        runs the request here on the event loop (a tiny model with nothing queued), else a
        future of it (queued, within the timeout). Call it on the event loop."""
        call, response = self._start(request)
        if response is not None:
            return response
        queued = asyncio.ensure_future(self._queued(call))
        queued.add_done_callback(call.release)  # the task holds the version until done
        return queued

    def _start(self, request: InferRequest) -> tuple[_Call, InferResponse | None]:
        """Check the request and run it at once if the model runs on the event loop: its
        response then, else None (the caller queues it with `_queued`, then releases)."""
        model = self.registry.get(request.model_name, request.model_version)
        call = _Call(model, request)
        try:
            checked = call.checked = self.validate(model, request)
            call.decoded = time.perf_counter()
            with self.admitted(model):
                results = model.run_inline(checked.tensors, checked.batch_size, call.timing)
            return call, None if results is None else self._respond(call, results)
        except BaseException:
            model.statistics.failed(time.perf_counter() - call.started)
            call.release()
            raise

    async def _queued(self, call: _Call) -> InferResponse:
        model, checked = call.model, call.checked
        try:
            with self.admitted(model):
                run = model.run(checked.tensors, checked.batch_size, call.timing)
                results = await self.within_timeout(model, run)
            return self._respond(call, results)
        except BaseException:
            model.statistics.failed(time.perf_counter() - call.started)
            raise

    def _respond(self, call: _Call, results: dict[str, np.ndarray]) -> InferResponse:
        """The response from the run's outputs; the request's figures, recorded after it."""
        model, checked = call.model, call.checked
        finishing = time.perf_counter()
        labels = model.labels
        outputs = [
            OutputTensor(
                spec.name,
                classify(results[spec.name], spec.classification, labels[spec.name])
                if spec.classification
                else results[spec.name],
                spec.binary,
            )
            for spec in checked.outputs
        ]
        end = time.perf_counter()
        started = call.started
        seconds = (end - started, call.decoded - started, end - finishing)  # total, in, out
        self.metrics.later(self._succeeded, model, checked.batch_size, call.timing, seconds)
        call.release()
        return InferResponse(model.name, str(model.version), call.request.id, outputs)

    def _succeeded(
        self,
        model: LoadedModel,
        batch_size: int,
        timing: RunTiming,
        seconds: tuple[float, float, float],
    ) -> None:
        """A successful request's metrics and statistics (after its answer was sent)."""
        total, decode, encode = seconds
        self.metrics.request_batch_size.labels(model.name).observe(batch_size)
        model.statistics.succeeded(total, batch_size, timing, decode=decode, encode=encode)

    def refusal(self, name: str, version: str | None) -> ServiceError | None:
        """The 503 a request for this model would get now, or None (also None for unknown
        models: the request itself answers 404/503 with the reason). Protocols ask before
        reading a large body: reading and decoding megabytes only to refuse them would spend
        the CPU an overload leaves for the accepted requests."""
        try:
            model = self.registry.get(name, version)
        except ServiceError:
            return None
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.rejected.labels(model.name, "concurrency").inc()
            return self._too_many()
        return model.scheduler.full()

    def _too_many(self) -> Unavailable:
        return Unavailable(
            f"{self.in_flight} requests are in flight, the limit "
            f"(BNSERVE_MAX_CONCURRENCY={self.settings.max_concurrency}); retry later"
        )

    def admitted(self, model: LoadedModel) -> _Admitted:
        """Admission for one request (`with inference.admitted(model):`): a bounded in-flight
        count across all models; 503 past BNSERVE_MAX_CONCURRENCY."""
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.rejected.labels(model.name, "concurrency").inc()
            raise self._too_many()
        return _Admitted(self)

    async def within_timeout(self, model: LoadedModel, work, what: str = "inference"):
        try:
            # asyncio.timeout cancels this task in place; wait_for would wrap `work` in a task
            # of its own, one more event-loop round trip per request.
            async with asyncio.timeout(self.settings.request_timeout):
                return await work
        except TimeoutError:
            self.metrics.rejected.labels(model.name, "timeout").inc()
            raise GatewayTimeout(
                f"{what} on model '{model.name}' took longer than "
                f"{self.settings.request_timeout:g} s (BNSERVE_REQUEST_TIMEOUT); abandoned"
            ) from None


def classify(scores: np.ndarray, top_k: int, labels: list[str] | None) -> np.ndarray:
    """Triton's classification extension: top-k "value:index[:label]" strings per sample."""
    if scores.ndim < 1 or scores.dtype == object:
        raise BadRequest("classification needs a numeric output; expected one with classes")
    # As Triton: per sample, the classes are all of its values (an image output's too).
    batched = scores.ndim > 1
    flat = scores.reshape(scores.shape[0] if batched else 1, -1)
    k = min(top_k, flat.shape[1])
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    rows = []
    for row, indices in zip(flat, order, strict=True):
        cells = []
        for index in indices:
            label = f":{labels[index]}" if labels and index < len(labels) else ""
            cells.append(f"{float(row[index]):f}:{int(index)}{label}".encode())
        rows.append(cells)
    table = np.array(rows, dtype=np.object_).reshape(len(rows), k)
    return table if batched else table.reshape(k)


class _Admitted:
    """One admitted request's hold on the in-flight count (a plain context manager: cheaper
    per request than a generator one)."""

    __slots__ = ("service",)

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    def __enter__(self) -> None:
        self.service.in_flight += 1

    def __exit__(self, *exc) -> None:
        self.service.in_flight -= 1


class _Call:
    """One inference request from its checks to its response. It holds the model version
    (`LoadedModel.use`) until released: at once for a run on the loop; for a queued run, when
    `infer` returns or `infer_now`'s task is done, whoever awaits it or not."""

    __slots__ = ("_hold", "checked", "decoded", "model", "request", "started", "timing")

    def __init__(self, model: LoadedModel, request: InferRequest) -> None:
        self.model = model
        self.request = request
        self._hold = model.use()
        self._hold.__enter__()
        self.started = time.perf_counter()
        self.decoded = self.started
        self.checked: ValidatedRequest | None = None
        self.timing = RunTiming()

    def release(self, _done: object = None) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.__exit__(None, None, None)
