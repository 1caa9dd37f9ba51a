"""Model repository extension: index, load (picks up new versions), unload. Admin token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import ValidationError

from ..errors import BadRequest
from ..protocol.codec import describe_validation_error
from ..protocol.schemas import ErrorResponse, RepositoryIndexRequest, RepositoryModel
from ..security import check_bearer
from ..state import Services, ServicesDep

router = APIRouter(tags=["repository"])
ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}


async def admin(s: ServicesDep, authorization: Annotated[str | None, Header()] = None) -> Services:
    check_bearer(authorization, s.settings.admin_token, "the repository API", "BNSERVE_ADMIN_TOKEN")
    return s


async def _ready_filter(request: Request) -> bool:
    """The optional body {"ready": true}; tritonclient posts an empty body."""
    body = await request.body()
    if not body.strip():
        return False
    try:
        return RepositoryIndexRequest.model_validate_json(body).ready
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None


AdminDep = Annotated[Services, Depends(admin)]


@router.post("/v2/repository/index", response_model=list[RepositoryModel], responses=ERRORS)
async def index(request: Request, s: AdminDep) -> list[dict]:
    only_ready = await _ready_filter(request)
    rows = s.registry.index()
    return [r for r in rows if r["state"] == "READY"] if only_ready else rows


@router.post("/v2/repository/models/{model_name}/load", responses=ERRORS)
async def load(model_name: str, s: AdminDep) -> dict:
    entry = await s.registry.load(model_name)
    return {"name": model_name, "versions": {str(v): st.state for v, st in entry.versions.items()}}


@router.post("/v2/repository/models/{model_name}/unload", responses=ERRORS)
async def unload(model_name: str, s: AdminDep) -> dict:
    await s.registry.unload(model_name)
    return {"name": model_name, "state": "UNAVAILABLE"}
