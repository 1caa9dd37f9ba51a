from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import ServicesDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(s: ServicesDep) -> Response:
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)
