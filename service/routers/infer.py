"""POST /v2/models/{model}[/versions/{version}]/infer: JSON or binary tensor data.

A thin REST codec over the data plane: the body (binary tensors stay views of it) becomes an
InferRequest, the InferResponse becomes the body; the work and the checks are in the plane.

Served by InferRoute, a plain ASGI endpoint that RequestContextMiddleware calls for these
paths ahead of FastAPI: routing, dependency injection and Request/Response objects cost more
than the rest of a small model's request. The FastAPI routes below answer the same way (the
same _infer) and document the API in OpenAPI; they serve when the fast route is off.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import orjson
from fastapi import APIRouter, Request, Response

from ..dataplane.plane import DataPlane
from ..dataplane.types import InferRequest, InferResponse
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


@dataclass(slots=True)
class Answer:
    """An infer request's HTTP answer: status, body and the headers that go with it."""

    status: int
    content: bytes
    headers: dict[str, str]
    media_type: str | None = None  # content-type, when `headers` has none


def _decoded(
    s: DataPlane, name: str, version: str | None, body: bytes, header_length: str | None
) -> InferRequest:
    s.check_model(name, version)  # an unknown model's error says so, not what the body lacks
    return decode_request(name, version, body, header_length)


def start_infer(
    s: DataPlane, name: str, version: str | None, body: bytes, header_length: str | None
) -> InferResponse | asyncio.Future[InferResponse]:
    """Decode and run: the response at once for a run on the event loop, else its future."""
    return s.infer_now(_decoded(s, name, version, body, header_length))


def answer_of(result: InferResponse | Exception) -> Answer:
    """The answer for a response, or for the error raised on the way: what the FastAPI route
    and the app's exception handlers give."""
    if isinstance(result, InferResponse):
        try:
            content, headers = encode_response(result)
        except Exception as exc:
            result = exc
        else:
            return Answer(200, content, headers)
    if isinstance(result, ServiceError):
        return Answer(
            result.status_code, orjson.dumps({"error": result.message}), result.headers or {},
            "application/json",
        )  # fmt: skip
    log.error("unhandled error", exc_info=result)
    content = orjson.dumps({"error": f"internal error ({type(result).__name__})"})
    return Answer(500, content, {}, "application/json")


async def _infer(
    s: DataPlane, name: str, version: str | None, body: bytes, header_length: str | None
) -> InferResponse:
    # Awaited in this task (DataPlane.infer), not through infer_now's task of its own.
    return await s.infer(_decoded(s, name, version, body, header_length))


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
            result = await _infer(self.plane, name, version, body, header_length)
        except Exception as exc:
            result = exc
        answer = answer_of(result)
        raw = [(b"content-length", str(len(answer.content)).encode())]
        if answer.media_type is not None:
            raw.append((b"content-type", answer.media_type.encode()))
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        await send({"type": "http.response.body", "body": answer.content})


async def _fastapi_infer(s: Services, request: Request, name: str, version: str | None) -> Response:
    body = await request.body()
    response = await _infer(s, name, version, body, request.headers.get(HEADER_LENGTH))
    content, headers = encode_response(response)
    return Response(content, headers=headers)


@router.post(INFER, openapi_extra=REQUEST_BODY)
async def infer(model_name: str, request: Request, s: ServicesDep) -> Response:
    return await _fastapi_infer(s, request, model_name, None)


@router.post(INFER_VERSION, openapi_extra=REQUEST_BODY)
async def infer_version(
    model_name: str, model_version: str, request: Request, s: ServicesDep
) -> Response:
    return await _fastapi_infer(s, request, model_name, model_version)
