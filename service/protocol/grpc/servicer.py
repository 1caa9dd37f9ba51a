"""The GRPCInferenceService handlers: parse the message, call the data plane, encode the answer.

Handlers take and return serialized bytes (no grpcio (de)serializers): a message that is not
valid protobuf, or larger than BNSERVE_MAX_REQUEST_BYTES, then gets INVALID_ARGUMENT or
RESOURCE_EXHAUSTED with a clear message instead of grpcio's INTERNAL. Every ServiceError maps
to the status code matching its HTTP status, with REST's message.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from ... import errors
from ...dataplane.plane import DataPlane
from ...logs import new_request_id, request_id
from . import bnserve_inference_pb2 as pb
from .codec import InferMessage, decode_infer, encode_infer, from_model, parse_infer

log = logging.getLogger("bnserve.access")

SERVICE = "inference.GRPCInferenceService"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
STATUS = {
    errors.BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.GatewayTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
}

Handler = Callable[[object, grpc.aio.ServicerContext], Awaitable[object]]


def status_of(error: errors.ServiceError) -> grpc.StatusCode:
    return STATUS.get(type(error), grpc.StatusCode.INTERNAL)


class Servicer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.observer = plane.observer

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_unload),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(self._wrap(name, kind, handler))
                for name, (kind, handler) in methods.items()
            },
        )

    def _wrap(self, name: str, kind, handler: Handler):
        """Parsing, limits, request id, error mapping, metrics and the access log."""
        endpoint = f"/{SERVICE}/{name}"
        parse = parse_infer if kind is pb.ModelInferRequest else kind.FromString

        async def call(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = self.observer.started()
            supplied = ""
            for key, value in context.invocation_metadata() or ():
                if key == "x-request-id":
                    supplied = value
            rid = supplied if _SAFE_ID.match(supplied) else new_request_id()
            token = request_id.set(rid)
            code, message, model = grpc.StatusCode.OK, "", ""
            try:
                self.plane.check_size(len(data), "request message")
                try:
                    request = parse(data)
                except DecodeError:
                    raise errors.BadRequest(
                        f"request is not a valid {kind.DESCRIPTOR.name} protobuf message; "
                        f"expected the KServe v2 {name} request"
                    ) from None
                model = getattr(request, "model_name", "") or getattr(request, "name", "")
                response = await handler(request, context)
                return response.SerializeToString()
            except errors.ServiceError as exc:
                code, message = status_of(exc), exc.message
                if exc.headers:  # retry-after, www-authenticate: as trailing metadata
                    context.set_trailing_metadata(tuple(exc.headers.items()))
            except asyncio.CancelledError:  # the client went away or its deadline passed
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # a bug, not the client's fault: say so, keep serving
                log.exception("unhandled error in %s", endpoint)
                code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})"
            finally:
                self.observer.finished(
                    started, endpoint=endpoint, model=model, code=code.name, method="gRPC",
                    path=endpoint,
                )  # fmt: skip
                request_id.reset(token)
            await context.abort(code, message)

        return call

    # -- health and metadata ----------------------------------------------------------------
    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def model_ready(self, request, context):
        """As Triton's: an unknown model or version is not ready (OK), not NOT_FOUND, so
        tritonclient's is_model_ready answers False instead of raising."""
        try:
            state = self.plane.model_ready(request.name, request.version or None)
        except errors.NotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=state.ready)

    async def server_metadata(self, request, context):
        return from_model(self.plane.server_metadata(), pb.ServerMetadataResponse())

    async def model_metadata(self, request, context):
        metadata = self.plane.model_metadata(request.name, request.version or None)
        response = pb.ModelMetadataResponse(
            name=metadata.name, versions=metadata.versions, platform=metadata.platform
        )
        for specs, into in (
            (metadata.inputs, response.inputs),
            (metadata.outputs, response.outputs),
        ):
            for spec in specs:
                into.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    async def model_config(self, request, context):
        config = self.plane.model_config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=from_model(config, pb.ModelConfig()))

    async def model_statistics(self, request, context):
        statistics = self.plane.statistics(request.name or None, request.version or None)
        return from_model(statistics, pb.ModelStatisticsResponse())

    # -- inference --------------------------------------------------------------------------
    async def model_infer(self, request: InferMessage, context):
        name, version = request.message.model_name, request.message.model_version or None
        self.plane.check_model(name, version)
        refusal = self.plane.refusal(name, version)
        if refusal is not None:  # before decoding the tensors
            raise refusal
        return encode_infer(await self.plane.infer(decode_infer(request)))

    # -- repository (admin token in the `authorization` metadata) ---------------------------
    def _authorize(self, context) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value
        self.plane.authorize_admin(authorization)

    async def repository_index(self, request, context):
        self._authorize(context)
        response = pb.RepositoryIndexResponse()
        for row in self.plane.repository_index(request.ready):
            response.models.add(
                name=row.name, version=row.version or "", state=row.state, reason=row.reason
            )
        return response

    async def repository_load(self, request, context):
        self._authorize(context)
        await self.plane.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request, context):
        self._authorize(context)
        await self.plane.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
