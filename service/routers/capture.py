"""Traffic capture admin endpoints (admin token): start, stop, status. Capture stores request
inputs on disk; it is off unless BNSERVE_CAPTURE_DIR is set (404 otherwise)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import ValidationError

from ..capture import CaptureService, CaptureStartRequest, CaptureStatus
from ..errors import BadRequest
from ..live_hooks import CAPTURE
from ..protocol.codec import describe_validation_error
from ..state import Services
from .repository import ERRORS, AdminDep

router = APIRouter(tags=["repository"])
START_BODY = {
    "requestBody": {
        "required": False,
        "content": {"application/json": {"schema": CaptureStartRequest.model_json_schema()}},
    }
}


def _service(s: Services) -> CaptureService:
    return s.extra[CAPTURE]


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
    responses=ERRORS,
    openapi_extra=START_BODY,
)
async def start(model_name: str, request: Request, s: AdminDep) -> CaptureStatus:
    """Start storing this model's request inputs (latest ready version unless `version`),
    until stopped or a bound (max_samples, max_bytes) is reached."""
    service = _service(s)
    service.enabled()
    start_request = await _start_request(request)
    model = s.registry.get(model_name, start_request.version)
    return service.start(model, start_request)


@router.post(
    "/v2/repository/models/{model_name}/capture/stop",
    response_model=CaptureStatus,
    responses=ERRORS,
)
async def stop(model_name: str, s: AdminDep) -> CaptureStatus:
    """Stop the model's capture; the answer comes once its last shard is on disk."""
    capture = _service(s).stop(model_name)
    await asyncio.to_thread(capture.wait, 10.0)
    return capture.status()


@router.get(
    "/v2/repository/models/{model_name}/capture",
    response_model=CaptureStatus,
    responses=ERRORS,
)
async def status(model_name: str, s: AdminDep) -> CaptureStatus:
    """The model's running or last capture: samples, bytes, path, and why it stopped."""
    return _service(s).last(model_name).status()
