"""POST /v2/models/{model}[/versions/{version}]/infer: JSON or binary tensor data.

A thin REST codec over the data plane: the body (binary tensors stay views of it) becomes an
InferRequest, the InferResponse becomes the body; the work and the checks are in the plane.

Served by InferRoute, a plain ASGI endpoint that RequestContextMiddleware calls for these
paths ahead of FastAPI: routing, dependency injection and Request/Response objects cost more
than the rest of a small model's request. The FastAPI routes below answer the same way (the
same _infer) and document the API in OpenAPI; they serve when the fast route is off.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import APIRouter, Request, Response

from ..dataplane.plane import DataPlane
from ..errors import ServiceError
from ..protocol.codec import HEADER_LENGTH, decode_request, encode_response
from ..protocol.schemas import InferenceResponse
from ..state import Services, ServicesDep
from .responses import errors

log = logging.getLogger("bnserve.app")

INFER = "/v2/models/{model_name}/infer"
INFER_VERSION = "/v2/models/{model_name}/versions/{model_version}/infer"

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


async def _infer(
    s: DataPlane, name: str, version: str | None, body: bytes, header_length: str | None
) -> tuple[bytes, dict[str, str]]:
    s.check_model(name, version)  # an unknown model's error says so, not what the body lacks
    decoded = decode_request(name, version, body, header_length)
    return encode_response(await s.infer(decoded))


class InferRoute:
    """The infer endpoint as plain ASGI: the middleware has read the body (size limit,
    encoding) and set up the request id, metrics and access log; this answers exactly what
    the FastAPI route and the app's exception handlers would."""

    templates = (INFER, INFER_VERSION)  # metric labels, as FastAPI's route paths

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def __call__(
        self, name: str, version: str | None, body: bytes, header_length: str | None, send
    ) -> None:
        try:
            content, headers = await _infer(self.plane, name, version, body, header_length)
        except ServiceError as exc:
            content = orjson.dumps({"error": exc.message})
            await _answer(send, exc.status_code, content, exc.headers, b"application/json")
            return
        except Exception as exc:
            log.exception("unhandled error")
            content = orjson.dumps({"error": f"internal error ({type(exc).__name__})"})
            await _answer(send, 500, content, {}, b"application/json")
            return
        await _answer(send, 200, content, headers)


async def _answer(
    send, status: int, content: bytes, headers: dict[str, str], media_type: bytes | None = None
) -> None:
    raw = [(b"content-length", str(len(content)).encode())]
    if media_type is not None:
        raw.append((b"content-type", media_type))
    raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


async def _fastapi_infer(s: Services, request: Request, name: str, version: str | None) -> Response:
    body = await request.body()
    content, headers = await _infer(s, name, version, body, request.headers.get(HEADER_LENGTH))
    return Response(content, headers=headers)


@router.post(INFER, openapi_extra=REQUEST_BODY)
async def infer(model_name: str, request: Request, s: ServicesDep) -> Response:
    return await _fastapi_infer(s, request, model_name, None)


@router.post(INFER_VERSION, openapi_extra=REQUEST_BODY)
async def infer_version(
    model_name: str, model_version: str, request: Request, s: ServicesDep
) -> Response:
    return await _fastapi_infer(s, request, model_name, model_version)
