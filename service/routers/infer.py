"""POST /v2/models/{model}[/versions/{version}]/infer: JSON or binary tensor data.

A thin REST codec over the data plane: the body (binary tensors stay views of it) becomes an
InferRequest, the InferResponse becomes the body; the work and the checks are in the plane."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from ..protocol.codec import HEADER_LENGTH, decode_request, encode_response
from ..protocol.schemas import InferenceResponse
from ..state import Services, ServicesDep
from .responses import errors

router = APIRouter(
    tags=["inference"],
    responses={
        200: {"model": InferenceResponse, "description": "outputs (JSON, or JSON + binary)"},
        **errors(400, 404, 413, 503, 504),
    },
)

REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "A v2 inference request. With the binary tensor data extension, the JSON "
        "header is followed by raw tensor bytes and its length is sent in the "
        "Inference-Header-Content-Length header.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}
        },
    }
}


async def _infer(s: Services, request: Request, name: str, version: str | None) -> Response:
    s.check_model(name, version)
    body = await request.body()
    decoded = decode_request(name, version, body, request.headers.get(HEADER_LENGTH))
    content, headers = encode_response(await s.infer(decoded))
    return Response(content, headers=headers)


@router.post("/v2/models/{model_name}/infer", openapi_extra=REQUEST_BODY)
async def infer(model_name: str, request: Request, s: ServicesDep) -> Response:
    return await _infer(s, request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    openapi_extra=REQUEST_BODY,
)
async def infer_version(
    model_name: str, model_version: str, request: Request, s: ServicesDep
) -> Response:
    return await _infer(s, request, model_name, model_version)
