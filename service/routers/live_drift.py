"""Live stat-drift: the pooled BatchNorm-input statistics of served traffic, per version.

Like the other stat-drift endpoints: 404 when BNSERVE_DEBUG_ENDPOINTS is false, the debug token
when BNSERVE_DEBUG_TOKEN is set.
"""

from __future__ import annotations

from fastapi import APIRouter

from ..drift.live_report import utc
from ..drift.live_schemas import LiveDriftResponse, LiveResetResponse
from ..drift.monitor import monitor_of
from ..protocol.schemas import ErrorResponse
from ..state import Services
from .drift import DebugDep

router = APIRouter(tags=["stat-drift (debug)"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 503)}
DOC = (
    "Per BatchNorm layer, the statistics of its input on the served path pooled over the "
    "sampled requests of the current window and of the closed windows kept (history), compared "
    "with the layer's stored running statistics as stat-drift compares a batch. "
    "return_statistics=true adds per-channel mean and biased var under each layer's global."
)


def _report(s: Services, name: str, version: str | None, return_statistics: bool):
    model = s.registry.get(name, version)
    return monitor_of(model).report(with_values=return_statistics)


def _reset(s: Services, name: str, version: str | None) -> LiveResetResponse:
    model = s.registry.get(name, version)
    start = monitor_of(model).reset()
    return LiveResetResponse(
        model_name=model.name, model_version=str(model.version), window_start=utc(start)
    )


@router.get(
    "/v2/models/{model_name}/stat-drift/live",
    response_model=LiveDriftResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    description=DOC,
)
async def live(model_name: str, s: DebugDep, return_statistics: bool = False):
    return _report(s, model_name, None, return_statistics)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stat-drift/live",
    response_model=LiveDriftResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    description=DOC,
)
async def live_version(
    model_name: str, model_version: str, s: DebugDep, return_statistics: bool = False
):
    return _report(s, model_name, model_version, return_statistics)


@router.post(
    "/v2/models/{model_name}/stat-drift/live/reset",
    response_model=LiveResetResponse,
    responses=ERRORS,
)
async def reset(model_name: str, s: DebugDep) -> LiveResetResponse:
    """Close the current window (it joins the history) and start a new one now."""
    return _reset(s, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/stat-drift/live/reset",
    response_model=LiveResetResponse,
    responses=ERRORS,
)
async def reset_version(model_name: str, model_version: str, s: DebugDep) -> LiveResetResponse:
    """Close the current window (it joins the history) and start a new one now."""
    return _reset(s, model_name, model_version)
