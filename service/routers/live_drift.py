"""Live stat-drift: the pooled BatchNorm-input statistics of served traffic, per version.

Like the other stat-drift endpoints: 404 when BNSERVE_DEBUG_ENDPOINTS is false, the debug token
when BNSERVE_DEBUG_TOKEN is set (declared once for the router).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..drift.live_schemas import LiveDriftResponse, LiveResetResponse
from ..state import ServicesDep
from .drift import debug_token, enabled
from .responses import errors

router = APIRouter(
    tags=["stat-drift (debug)"],
    dependencies=[Depends(enabled), Depends(debug_token)],
    responses=errors(400, 401, 404, 503),
)
DOC = (
    "Per BatchNorm layer, the statistics of its input on the served path pooled over the "
    "sampled requests of the current window and of the closed windows kept (history), compared "
    "with the layer's stored running statistics as stat-drift compares a batch. "
    "return_statistics=true adds per-channel mean and biased var under each layer's global."
)
RESET_DOC = "Close the current window (it joins the history) and start a new one now."


@router.get(
    "/v2/models/{model_name}/stat-drift/live",
    response_model=LiveDriftResponse,
    response_model_exclude_none=True,
    description=DOC,
)
async def live(model_name: str, s: ServicesDep, return_statistics: bool = False):
    return s.live_drift(model_name, None, return_statistics)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stat-drift/live",
    response_model=LiveDriftResponse,
    response_model_exclude_none=True,
    description=DOC,
)
async def live_version(
    model_name: str, model_version: str, s: ServicesDep, return_statistics: bool = False
):
    return s.live_drift(model_name, model_version, return_statistics)


@router.post(
    "/v2/models/{model_name}/stat-drift/live/reset",
    response_model=LiveResetResponse,
    description=RESET_DOC,
)
async def reset(model_name: str, s: ServicesDep) -> LiveResetResponse:
    return s.live_drift_reset(model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/stat-drift/live/reset",
    response_model=LiveResetResponse,
    description=RESET_DOC,
)
async def reset_version(model_name: str, model_version: str, s: ServicesDep) -> LiveResetResponse:
    return s.live_drift_reset(model_name, model_version)
