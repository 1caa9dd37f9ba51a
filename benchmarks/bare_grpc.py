"""The gRPC counterpart of benchmarks/bare_asgi.py: grpcio's asyncio server on uvloop, with
bnserve's server options, that receives each ModelInfer message whole and answers a fixed
ModelInferResponse (ten FP32 logits in raw_output_contents, as the bare ASGI app answers ten
in JSON), nothing else.

    python -m benchmarks.bare_grpc --port 8102

Beside the bare ASGI app it gives the transport floor of each protocol on this stack, so a
benchmark can show how much of a gRPC / REST ratio is grpcio's transport against uvicorn's
and how much is the service's.
"""

from __future__ import annotations

import argparse
import contextlib

import grpc
import uvloop

from benchmarks.bare_asgi import keep_freed_memory
from service.config import Settings
from service.protocol.grpc.server import server_options

SERVICE = "inference.GRPCInferenceService"
OUTPUTS = 10


def fixed_response() -> bytes:
    from tritonclient.grpc import service_pb2

    response = service_pb2.ModelInferResponse(model_name="digits", model_version="1")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, OUTPUTS])
    response.raw_output_contents.append(bytes(4 * OUTPUTS))
    return response.SerializeToString()


def fixed_answer():
    """A ModelInfer handler answering `fixed_response()` to every message, unread."""
    answer = fixed_response()

    async def model_infer(request: bytes, context) -> bytes:  # bytes in, bytes out: no parsing
        return answer

    return model_infer


async def serve(host: str, port: int, model_infer) -> None:
    """grpcio's asyncio server with bnserve's options, ModelInfer answered by `model_infer`
    (serialized message in, serialized message out)."""
    settings = Settings()
    server = grpc.aio.server(
        options=server_options(settings.max_request_bytes, settings.max_connections)
    )
    handler = grpc.unary_unary_rpc_method_handler(model_infer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": handler}),)
    )
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    keep_freed_memory()  # as the bare ASGI app does
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, fixed_answer()))


if __name__ == "__main__":
    main()
