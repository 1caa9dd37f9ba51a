"""The data plane: every call a client can make, protocol-independent.

REST routers (service/routers/) and the gRPC servicer (service/protocol/grpc/) are thin codecs
over this class: they turn their wire format into the typed requests of .types or plain
arguments, call one method, and encode what comes back or the ServiceError raised (each maps to
an HTTP status and a gRPC status code with the same message).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .. import __version__
from ..capture import CaptureService, CaptureStartRequest, CaptureStatus
from ..config import Settings
from ..drift.live_report import utc
from ..drift.live_schemas import LiveDriftResponse, LiveResetResponse
from ..drift.monitor import monitor_of
from ..drift.schemas import StatDriftResponse
from ..drift.service import DriftService
from ..errors import NotFound, ServiceError, Unavailable
from ..metrics import Metrics
from ..model import LoadedModel
from ..protocol.datatypes import TRITON_TYPES, element_size
from ..protocol.schemas import (
    ModelMetadata,
    ModelStatistics,
    ModelStatisticsResponse,
    RepositoryModel,
    ServerMetadata,
    TritonDynamicBatching,
    TritonModelConfig,
    TritonTensorConfig,
)
from ..registry import ModelRegistry
from ..security import check_bearer
from .inference import InferenceService
from .observe import CallObserver, too_large
from .types import InferRequest, InferResponse

EXTENSIONS = [
    "binary_tensor_data",
    "model_repository",
    "classification",
    "statistics",
    "bnserve_stat_drift",
]
PLATFORM = "onnxruntime_onnx"
# Room for a request's JSON header when the byte limit is turned into a batch-size limit.
HEADER_ALLOWANCE = 64 * 1024
INT32_MAX = 2**31 - 1


@dataclass(slots=True)
class ModelReadiness:
    name: str
    version: str | None
    ready: bool


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        registry: ModelRegistry,
        inference: InferenceService,
        drift: DriftService | None = None,
        *,
        capture: CaptureService | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.inference = inference
        self.drift = drift  # when debug endpoints are on
        self.capture = capture  # traffic capture (off unless BNSERVE_CAPTURE_DIR is set)
        self.observer = CallObserver(metrics, registry.knows)
        self.started = False  # first repository load finished
        self.draining = False  # shutting down: not ready, finishing what is in flight

    # -- health and metadata ----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata(name="bnserve", version=__version__, extensions=EXTENSIONS)

    def model_ready(self, name: str, version: str | None) -> ModelReadiness:
        """Ready only when the server and the version both are (404 for unknown models)."""
        try:
            model = self.registry.get(name, version)
        except Unavailable:
            return ModelReadiness(name, version, False)
        return ModelReadiness(name, str(model.version), self.ready)

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        try:
            model = self.registry.get(name, version)
        except Unavailable:
            if version:
                raise
            return self._unavailable_metadata(name)
        entry = self.registry.entry(model.name)
        card = model.card
        return ModelMetadata(
            name=model.name,
            versions=[str(v) for v in entry.ready_versions()],
            platform=PLATFORM,
            inputs=model.inputs,
            outputs=model.outputs,
            parameters={
                "version": str(model.version),
                "execution_provider": model.provider,
                "state": "READY",
                "description": card.description,
                "created": card.created,
                "batch_norm": [
                    {"name": b.name, "channels": b.channels, "removed_by": b.removed_by,
                     "statistics": b.statistics}
                    for b in card.batch_norm
                ],
                "verification": card.verification,
                "samples": card.samples,
                "stat_drift": model.drift is not None,
            },
        )  # fmt: skip

    def _unavailable_metadata(self, name: str) -> ModelMetadata:
        """A known model with no ready version: its state and why, so operators can see it."""
        entry = self.registry.entry(name)
        return ModelMetadata(
            name=name,
            versions=[],
            platform=PLATFORM,
            inputs=[],
            outputs=[],
            parameters={
                "state": "UNAVAILABLE",
                "reason": self.registry.why_unavailable(entry),
                "versions": {
                    str(v): {"state": st.state.value, "reason": st.reason}
                    for v, st in sorted(entry.versions.items())
                },
            },
        )

    def model_config(self, name: str, version: str | None = None) -> TritonModelConfig:
        """Triton's view of the model, as its auto-complete would write it: with a dynamic
        batch axis, max_batch_size is the serving limit and dims leave the batch axis out."""
        model = self.registry.get(name, version)
        limit = max_batch_size(model, self.settings.max_request_bytes)

        def tensors(specs) -> list[TritonTensorConfig]:
            return [
                TritonTensorConfig(
                    name=t.name,
                    data_type=TRITON_TYPES[t.datatype],
                    dims=t.shape[1:] if limit else t.shape,
                )
                for t in specs
            ]

        batching = model.batching
        return TritonModelConfig(
            name=model.name,
            max_batch_size=limit,
            input=tensors(model.inputs),
            output=tensors(model.outputs),
            dynamic_batching=TritonDynamicBatching(
                preferred_batch_size=list(batching.preferred_batch_sizes),
                max_queue_delay_microseconds=batching.max_queue_delay_us,
            )
            if batching.enabled
            else None,
        )

    # -- admission --------------------------------------------------------------------------
    def check_size(self, size: int, what: str = "request body") -> None:
        """413 / RESOURCE_EXHAUSTED past BNSERVE_MAX_REQUEST_BYTES."""
        if size > self.settings.max_request_bytes:
            self.observer.refused_too_large()
            raise too_large(size, self.settings.max_request_bytes, what)

    def refusal(self, name: str, version: str | None) -> ServiceError | None:
        """The 503 an inference request for this model would get now (too many in flight, queue
        full), for a protocol to answer before it reads or decodes the tensors; else None."""
        return self.inference.refusal(name, version)

    # -- inference --------------------------------------------------------------------------
    def check_model(self, name: str, version: str | None) -> None:
        """404/503 for a model that cannot serve, before a codec decodes the tensors: an
        unknown model's error says so, not what is wrong with the body."""
        self.registry.get(name, version)

    async def infer(self, request: InferRequest) -> InferResponse:
        return await self.inference.infer(request)

    def infer_now(self, request: InferRequest) -> InferResponse | asyncio.Future[InferResponse]:
        """`infer` without a coroutine: the response when the run happened at once on the
        event loop (a tiny model), else a future of it."""
        return self.inference.infer_now(request)

    async def stat_drift(self, request: InferRequest) -> StatDriftResponse:
        if self.drift is None:
            raise NotFound("debug endpoints are turned off (BNSERVE_DEBUG_ENDPOINTS=false)")
        return await self.drift.analyze(request)

    def live_drift(self, name: str, version: str | None, with_values: bool) -> LiveDriftResponse:
        """Live stat-drift: pooled BN-input statistics of the version's sampled traffic."""
        self._debug_on()
        return monitor_of(self.registry.get(name, version)).report(with_values=with_values)

    def live_drift_reset(self, name: str, version: str | None) -> LiveResetResponse:
        """Close the version's current live window (it joins the history); start a new one."""
        self._debug_on()
        model = self.registry.get(name, version)
        start = monitor_of(model).reset()
        return LiveResetResponse(
            model_name=model.name, model_version=str(model.version), window_start=utc(start)
        )

    def _debug_on(self) -> None:
        if self.drift is None:
            raise NotFound("debug endpoints are turned off (BNSERVE_DEBUG_ENDPOINTS=false)")

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> ModelStatisticsResponse:
        """Triton's statistics extension: every ready version, or one model's (one version's)."""
        self.metrics.later.flush()  # requests already answered are counted
        if name:
            models = [self.registry.get(name, version)] if version else self._versions(name)
        else:
            models = self.registry.loaded_models()
        return ModelStatisticsResponse(
            model_stats=[
                ModelStatistics.model_validate(m.statistics.as_dict(m.name, str(m.version)))
                for m in sorted(models, key=lambda m: (m.name, m.version))
            ]
        )

    def _versions(self, name: str) -> list[LoadedModel]:
        entry = self.registry.entry(name)
        return [s.model for s in entry.versions.values() if s.model is not None]

    # -- repository (admin token) -----------------------------------------------------------
    def authorize_admin(self, authorization: str | None) -> None:
        check_bearer(
            authorization, self.settings.admin_token, "the repository API", "BNSERVE_ADMIN_TOKEN"
        )

    def authorize_debug(self, authorization: str | None) -> None:
        check_bearer(authorization, self.settings.debug_token, "stat-drift", "BNSERVE_DEBUG_TOKEN")

    def repository_index(self, only_ready: bool = False) -> list[RepositoryModel]:
        rows = [RepositoryModel.model_validate(r) for r in self.registry.index()]
        return [r for r in rows if r.state == "READY"] if only_ready else rows

    async def load(self, name: str) -> dict[str, str]:
        """(Re)load a model; the state of each of its versions."""
        entry = await self.registry.load(name)
        return {str(v): st.state.value for v, st in entry.versions.items()}

    async def unload(self, name: str) -> None:
        await self.registry.unload(name)

    # -- traffic capture (admin token) --------------------------------------------------------
    def captures(self) -> CaptureService:
        """The capture service, or 404 when capture is off."""
        if self.capture is None:
            raise NotFound("traffic capture is off: BNSERVE_CAPTURE_DIR is not set")
        self.capture.enabled()
        return self.capture

    def capture_start(self, name: str, request: CaptureStartRequest) -> CaptureStatus:
        service = self.captures()
        return service.start(self.registry.get(name, request.version), request)

    async def capture_stop(self, name: str) -> CaptureStatus:
        """Stop the model's capture; answers once its last shard is on disk (10 s at most)."""
        capture = self.captures().stop(name)
        await asyncio.to_thread(capture.wait, 10.0)
        return capture.status()

    def capture_status(self, name: str) -> CaptureStatus:
        return self.captures().last(name).status()


def max_batch_size(model: LoadedModel, max_request_bytes: int) -> int:
    """The serving limit Triton clients read as max_batch_size: the dynamic batcher's limit,
    or the most samples that fit BNSERVE_MAX_REQUEST_BYTES as binary data; 0 without a
    dynamic batch axis (the model takes one fixed shape)."""
    if not model.batch_axis:
        return 0
    if model.batching.enabled:
        return model.batching.max_batch_size
    per_sample = sum(
        max(1, _elements(t.shape[1:])) * (element_size(t.datatype) or 4) for t in model.inputs
    )
    room = max(max_request_bytes - HEADER_ALLOWANCE, per_sample)
    return min(INT32_MAX, room // per_sample)


def _elements(dims: list[int]) -> int:
    count = 1
    for d in dims:
        count *= max(d, 1)
    return count
