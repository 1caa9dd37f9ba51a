"""Model metadata, readiness and a Triton-style config (tritonclient.get_model_config)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..errors import Unavailable
from ..model import LoadedModel
from ..protocol.datatypes import TRITON_TYPES
from ..protocol.schemas import ErrorResponse, ModelMetadata, ModelReadyResponse
from ..state import Services, ServicesDep

router = APIRouter(tags=["models"])
ERRORS = {404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def metadata(s: Services, model: LoadedModel) -> ModelMetadata:
    entry = s.registry.entry(model.name)
    card = model.card
    return ModelMetadata(
        name=model.name,
        versions=[str(v) for v in entry.ready_versions()],
        platform="onnxruntime_onnx",
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
            "stat_drift": "stat_drift" in model.extensions,
        },
    )  # fmt: skip


@router.get(
    "/v2/models/{model_name}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def model_metadata(model_name: str, s: ServicesDep):
    try:
        return metadata(s, s.registry.get(model_name))
    except Unavailable:
        return unavailable_metadata(s, model_name)


def unavailable_metadata(s: Services, name: str) -> ModelMetadata:
    """A known model with no ready version: its state and why, so operators can see it."""
    entry = s.registry.entry(name)
    return ModelMetadata(
        name=name,
        versions=[],
        platform="onnxruntime_onnx",
        inputs=[],
        outputs=[],
        parameters={
            "state": "UNAVAILABLE",
            "reason": s.registry.why_unavailable(entry),
            "versions": {
                str(v): {"state": st.state.value, "reason": st.reason}
                for v, st in sorted(entry.versions.items())
            },
        },
    )


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def version_metadata(model_name: str, model_version: str, s: ServicesDep):
    return metadata(s, s.registry.get(model_name, model_version))


async def _ready(s: Services, name: str, version: str | None):
    """200 only when the server and the version are both ready (clients read the status)."""
    try:
        model = s.registry.get(name, version)
    except Unavailable:
        model = None
    if model is None or not s.ready:
        body = {"name": name, "version": version, "ready": False}
        return JSONResponse(body, status_code=503)
    return ModelReadyResponse(name=name, version=str(model.version), ready=True)


@router.get("/v2/models/{model_name}/ready", response_model=ModelReadyResponse, responses=ERRORS)
async def model_ready(model_name: str, s: ServicesDep):
    return await _ready(s, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReadyResponse,
    responses=ERRORS,
)
async def version_ready(model_name: str, model_version: str, s: ServicesDep):
    return await _ready(s, model_name, model_version)


@router.get("/v2/models/{model_name}/config", responses=ERRORS)
async def model_config(model_name: str, s: ServicesDep) -> dict:
    """The model's configuration in Triton's JSON form, for Triton tooling."""
    model = s.registry.get(model_name)

    batched = model.batching.enabled

    def tensors(specs):
        # Triton's dims leave out the batch axis when max_batch_size > 0.
        return [
            {"name": t.name, "data_type": TRITON_TYPES[t.datatype],
             "dims": t.shape[1:] if batched else t.shape}
            for t in specs
        ]  # fmt: skip

    config = {
        "name": model.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": model.batching.max_batch_size if batched else 0,
        "input": tensors(model.inputs),
        "output": tensors(model.outputs),
    }
    if batched:
        config["dynamic_batching"] = model.batching.triton()
    return config
