"""Model repository extension: index, load (picks up new versions), unload.

Every route needs the admin token (BNSERVE_ADMIN_TOKEN), declared once for the router."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import ValidationError

from ..errors import BadRequest
from ..protocol.codec import describe_validation_error
from ..protocol.schemas import ErrorResponse, RepositoryIndexRequest, RepositoryModel
from ..state import ServicesDep


async def admin(s: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> None:
    s.authorize_admin(authorization)


router = APIRouter(
    tags=["repository"],
    dependencies=[Depends(admin)],
    responses={
        400: {"model": ErrorResponse, "description": "the request does not fit the API"},
        401: {"model": ErrorResponse, "description": "missing or wrong admin bearer token"},
        404: {"model": ErrorResponse, "description": "model not in the repository"},
    },
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
