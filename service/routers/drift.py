"""Stat-drift debug endpoints: analysis, the page, and the model's sample batches.

All of them answer 404 when BNSERVE_DEBUG_ENDPOINTS is false. When BNSERVE_DEBUG_TOKEN is set,
the API calls need it as a bearer token; the page itself is static (it holds no model data),
asks for the token and sends it with its API calls.
"""

from __future__ import annotations

import html
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from fastapi.responses import HTMLResponse

from ..drift.schemas import StatDriftResponse
from ..errors import NotFound
from ..protocol.codec import HEADER_LENGTH, decode_request
from ..state import Services, ServicesDep
from .infer import REQUEST_BODY
from .responses import errors


async def enabled(s: ServicesDep) -> None:
    if not s.settings.debug_endpoints or s.drift is None:
        raise NotFound("debug endpoints are turned off (BNSERVE_DEBUG_ENDPOINTS=false)")


async def debug_token(s: ServicesDep, authorization: Annotated[str | None, Header()] = None):
    s.authorize_debug(authorization)


# The page is static (no model data) and asks for the token itself; the API needs the token.
router = APIRouter(
    tags=["stat-drift (debug)"], dependencies=[Depends(enabled)], responses=errors(404, 503)
)
api = APIRouter(dependencies=[Depends(debug_token)], responses=errors(400, 401, 404, 413, 503, 504))


async def _analyze(s: Services, request: Request, name: str, version: str | None):
    s.check_model(name, version)
    body = await request.body()
    return await s.stat_drift(
        decode_request(name, version, body, request.headers.get(HEADER_LENGTH))
    )


DOC = (
    "Runs the batch through the served eval-mode model (global statistics) and through a "
    "train-mode rewrite of it (batch statistics), and reports per BatchNorm layer how far the "
    "batch's statistics are from the stored running statistics. parameters.return_outputs "
    "adds both output sets; parameters.return_statistics adds per-channel values."
)


@api.post(
    "/v2/models/{model_name}/stat-drift",
    response_model=StatDriftResponse,
    response_model_exclude_none=True,
    openapi_extra=REQUEST_BODY,
    description=DOC,
)
async def stat_drift(model_name: str, request: Request, s: ServicesDep):
    return await _analyze(s, request, model_name, None)


@api.post(
    "/v2/models/{model_name}/versions/{model_version}/stat-drift",
    response_model=StatDriftResponse,
    response_model_exclude_none=True,
    openapi_extra=REQUEST_BODY,
    description=DOC,
)
async def stat_drift_version(model_name: str, model_version: str, request: Request, s: ServicesDep):
    return await _analyze(s, request, model_name, model_version)


@api.get("/v2/models/{model_name}/stat-drift/samples")
async def samples(model_name: str, s: ServicesDep) -> list[str]:
    """Names of the sample batches the model was exported with (e.g. the digits demo's)."""
    model = s.registry.get(model_name)
    return [p.removeprefix("samples/").removesuffix(".json") for p in model.card.samples]


@api.get("/v2/models/{model_name}/stat-drift/samples/{sample}")
async def sample(model_name: str, sample: str, s: ServicesDep) -> Response:
    """One sample batch as a v2 inference request body."""
    model = s.registry.get(model_name)
    relative = f"samples/{sample}.json"
    if relative not in model.card.samples:  # only listed files: no path from the request
        raise NotFound(f"model '{model_name}' has no sample '{sample}'")
    return Response((model.files.path / relative).read_bytes(), media_type="application/json")


@router.get("/v2/models/{model_name}/stat-drift/view", response_class=HTMLResponse)
async def view(model_name: str, s: ServicesDep) -> HTMLResponse:
    s.registry.get(model_name)  # 404 for unknown models
    page = resources.files("service").joinpath("static/drift.html").read_text()
    return HTMLResponse(page.replace("{{MODEL}}", html.escape(model_name)))


router.include_router(api)
