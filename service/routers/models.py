"""Model metadata, readiness and a Triton-style config (tritonclient.get_model_config)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..protocol.schemas import ModelMetadata, ModelReadyResponse, TritonModelConfig
from ..state import Services, ServicesDep
from .responses import errors

router = APIRouter(tags=["models"], responses=errors(404, 503))


@router.get(
    "/v2/models/{model_name}", response_model=ModelMetadata, response_model_exclude_none=True
)
async def model_metadata(model_name: str, s: ServicesDep):
    return s.model_metadata(model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    response_model_exclude_none=True,
)
async def version_metadata(model_name: str, model_version: str, s: ServicesDep):
    return s.model_metadata(model_name, model_version)


async def _ready(s: Services, name: str, version: str | None):
    """200 only when the server and the version are both ready (clients read the status)."""
    state = s.model_ready(name, version)
    if not state.ready:
        body = {"name": name, "version": version, "ready": False}
        return JSONResponse(body, status_code=503)
    return ModelReadyResponse(name=name, version=state.version, ready=True)


@router.get("/v2/models/{model_name}/ready", response_model=ModelReadyResponse)
async def model_ready(model_name: str, s: ServicesDep):
    return await _ready(s, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready", response_model=ModelReadyResponse
)
async def version_ready(model_name: str, model_version: str, s: ServicesDep):
    return await _ready(s, model_name, model_version)


@router.get(
    "/v2/models/{model_name}/config",
    response_model=TritonModelConfig,
    response_model_exclude_none=True,
)
async def model_config(model_name: str, s: ServicesDep):
    """The model's configuration in Triton's JSON form, for Triton tooling (perf_analyzer)."""
    return s.model_config(model_name)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/config",
    response_model=TritonModelConfig,
    response_model_exclude_none=True,
)
async def version_config(model_name: str, model_version: str, s: ServicesDep):
    """One version's configuration (Triton's route; gRPC ModelConfig takes a version too)."""
    return s.model_config(model_name, model_version)
