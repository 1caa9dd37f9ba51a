"""Traffic capture admin endpoints (admin token, declared once for the router): start, stop,
status. Capture stores request inputs on disk; it is off unless BNSERVE_CAPTURE_DIR is set (404
otherwise)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from ..capture import CaptureStartRequest, CaptureStatus
from ..errors import BadRequest
from ..protocol.codec import describe_validation_error
from ..state import ServicesDep
from .repository import admin
from .responses import errors

router = APIRouter(
    tags=["repository"], dependencies=[Depends(admin)], responses=errors(400, 401, 404, 413)
)
START_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": CaptureStartRequest.model_json_schema()}},
    }
}


async def _start_request(request: Request) -> CaptureStartRequest:
    body = await request.body()
    if not body.strip():
        return CaptureStartRequest()
    try:
        return CaptureStartRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


@router.post(
    "/v2/repository/models/{model_name}/capture/start",
    response_model=CaptureStatus,
    openapi_extra=START_BODY,
)
async def start(model_name: str, request: Request, s: ServicesDep) -> CaptureStatus:
    """Start storing this model's request inputs (latest ready version unless `version`),
    until stopped or a bound (max_samples, max_bytes) is reached."""
    s.captures()  # 404 "capture is off" before a body error
    return s.capture_start(model_name, await _start_request(request))


@router.post("/v2/repository/models/{model_name}/capture/stop", response_model=CaptureStatus)
async def stop(model_name: str, s: ServicesDep) -> CaptureStatus:
    """Stop the model's capture; the answer comes once its last shard is on disk."""
    return await s.capture_stop(model_name)


@router.get("/v2/repository/models/{model_name}/capture", response_model=CaptureStatus)
async def status(model_name: str, s: ServicesDep) -> CaptureStatus:
    """The model's running or last capture: samples, bytes, path, and why it stopped."""
    return s.capture_status(model_name)
