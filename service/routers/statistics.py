"""Triton's statistics extension over REST (tritonclient get_inference_statistics)."""

from __future__ import annotations

from fastapi import APIRouter

from ..protocol.schemas import ModelStatisticsResponse
from ..state import ServicesDep
from .responses import errors

router = APIRouter(tags=["statistics"], responses=errors(404, 503))


@router.get("/v2/models/stats", response_model=ModelStatisticsResponse)
async def all_statistics(s: ServicesDep):
    return s.statistics()


@router.get("/v2/models/{model_name}/stats", response_model=ModelStatisticsResponse)
async def model_statistics(model_name: str, s: ServicesDep):
    return s.statistics(model_name)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats",
    response_model=ModelStatisticsResponse,
)
async def version_statistics(model_name: str, model_version: str, s: ServicesDep):
    return s.statistics(model_name, model_version)
