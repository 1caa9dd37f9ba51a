"""Model repository extension: index, load (picks up new versions), unload.

Every route needs the admin token (BNSERVE_ADMIN_TOKEN), declared once for the router."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import ValidationError

from ..errors import BadRequest
from ..protocol.codec import describe_validation_error
from ..protocol.schemas import RepositoryIndexRequest, RepositoryModel
from ..state import ServicesDep
from .responses import errors


async def admin(s: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    s.authorize_admin(authorization)


router = APIRouter(
    tags=["repository"],
    dependencies=[Depends(admin)],
    responses=errors(400, 401, 404, 413),
)


async def _ready_filter(request: Request) -> bool:
    """The optional body {"ready": true}; tritonclient posts an empty body."""
    body = await request.body()
    if not body.strip():
        return False
    try:
        return RepositoryIndexRequest.model_validate_json(body).ready
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


@router.post("/v2/repository/index", response_model=list[RepositoryModel])
async def index(request: Request, s: ServicesDep):
    return s.repository_index(await _ready_filter(request))


@router.post("/v2/repository/models/{model_name}/load")
async def load(model_name: str, s: ServicesDep) -> dict:
    return {"name": model_name, "versions": await s.load(model_name)}


@router.post("/v2/repository/models/{model_name}/unload")
async def unload(model_name: str, s: ServicesDep) -> dict:
    await s.unload(model_name)
    return {"name": model_name, "state": "UNAVAILABLE"}
