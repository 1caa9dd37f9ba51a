from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..protocol.schemas import ErrorResponse, LiveResponse, ReadyResponse, ServerMetadata
from ..state import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/v2/health/live", response_model=LiveResponse)
async def live() -> LiveResponse:
    return LiveResponse(live=True)


@router.get(
    "/v2/health/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "loading or draining"}},
)
async def ready(s: ServicesDep):
    if s.ready:
        return ReadyResponse(ready=True)
    return JSONResponse({"ready": False}, status_code=503)


@router.get("/v2", response_model=ServerMetadata, responses={500: {"model": ErrorResponse}})
async def server_metadata(s: ServicesDep) -> ServerMetadata:
    return s.server_metadata()
