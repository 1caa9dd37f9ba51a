"""Inference as a plain class: request bytes in, response bytes out, no HTTP in sight.

Order of checks: the model (404/503), then the body against the model's signature (400), then
admission (503 when too many requests are in flight), then the run (504 past the timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import re

import numpy as np

from .config import Settings
from .errors import GatewayTimeout, ServiceError, Unavailable
from .metrics import Metrics
from .model import LoadedModel
from .protocol.codec import DecodedRequest, decode_request, encode_response, parse_request
from .registry import ModelRegistry

INFERENCE_PATH = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/(?:infer|stat-drift)$"
)


class InferenceService:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0
        # Each element takes at least one byte of body, binary or JSON.
        self.max_elements = settings.max_request_bytes

    def decode(self, model: LoadedModel, body: bytes, header_length: str | None) -> DecodedRequest:
        request, binary = parse_request(body, header_length)
        return decode_request(
            request,
            binary,
            model.inputs,
            model.outputs,
            max_elements=self.max_elements,
            reject_nonfinite=self.settings.reject_nonfinite,
        )

    async def infer(
        self, model_name: str, version: str | None, body: bytes, header_length: str | None
    ) -> tuple[bytes, dict[str, str]]:
        model = self.registry.get(model_name, version)
        with model.use():
            decoded = self.decode(model, body, header_length)
            results = await self.run(model, decoded.tensors, decoded.batch_size)
            return encode_response(
                model_name=model.name,
                model_version=str(model.version),
                request_id=decoded.request.id,
                results=results,
                requested=decoded.outputs,
                labels=model.labels,
            )

    def shed(self, path: str) -> ServiceError | None:
        """For the middleware, before a body is read: the 503 an inference request to `path`
        would get anyway (queue full, too many in flight). Reading and decoding megabytes only
        to refuse them would spend the CPU an overload leaves for the accepted requests."""
        match = INFERENCE_PATH.match(path)
        if match is None:
            return None
        try:
            model = self.registry.get(match["model"], match["version"])
        except ServiceError:
            return None  # the route answers 404/503 with the reason
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.rejected.labels(model.name, "concurrency").inc()
            return self._too_many()
        return model.scheduler.full()

    def _too_many(self) -> Unavailable:
        return Unavailable(
            f"{self.in_flight} requests are in flight, the limit "
            f"(BNSERVE_MAX_CONCURRENCY={self.settings.max_concurrency}); retry later"
        )

    @contextlib.contextmanager
    def admitted(self, model: LoadedModel):
        """Admission for one request: bounded in-flight count across all models."""
        if self.in_flight >= self.settings.max_concurrency:
            self.metrics.rejected.labels(model.name, "concurrency").inc()
            raise self._too_many()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

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

    async def run(
        self, model: LoadedModel, tensors: dict[str, np.ndarray], batch_size: int
    ) -> dict[str, np.ndarray]:
        """Run one request's tensors, bounded in concurrency, queue length and time."""
        with self.admitted(model):
            self.metrics.request_batch_size.labels(model.name).observe(batch_size)
            return await self.within_timeout(model, model.run(tensors, batch_size))
