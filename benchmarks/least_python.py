"""A server doing only a v2 request's own work, with none of bnserve's checks: a second floor
for the benchmarks, between the bare apps (no work) and bnserve (all its checks).

    python -m benchmarks.least_python --model artifacts/overhead/digits/1/model.onnx --port 8101

On the same uvicorn + httptools + uvloop as the floor, per request: read the body; with JSON
tensors, parse it with orjson and make the first input's `data` a float32 array of its
`shape`; with binary tensors (Inference-Header-Content-Length), parse the JSON header and view
the bytes after it as that array; refuse NaN/Inf; run the ONNX Runtime session bnserve would
make (service.runtime.SessionFactory) on the event loop; answer the first output as v2 JSON, or
as a binary tensor after a JSON header when the request was binary. No request id, limits,
metrics, statistics, logs, thread hop, or any check beyond the finite one, so it answers only
well-formed float32 requests for a one-input model.

    python -m benchmarks.least_python --model ... --port 8103 --grpc

answers ModelInfer over gRPC instead, on the same grpcio server as benchmarks.bare_grpc
(bnserve's options): parse the message as bnserve does (the first raw_input_contents a view
of the received bytes, as the HTTP mode's tensor is of the body), refuse NaN/Inf, run on the
event loop, answer the first output in raw_output_contents. Beside the HTTP mode it shows
what the two protocol stacks alone make of gRPC / REST for a model's whole request. (The HTTP
mode goes through uvicorn's ASGI cycle, ~25-70 µs here, which bnserve's HTTP path skips.)
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import numpy as np
import orjson
import uvicorn
import uvloop

from benchmarks import bare_asgi, bare_grpc
from service.runtime import SessionFactory


def least_app(model: Path):
    session = SessionFactory().create(model)
    output = session.get_outputs()[0].name
    prefix = {"model_name": model.parent.parent.name, "model_version": model.parent.name}

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":  # lifespan, readiness probes
            await bare_asgi.app(scope, receive, send)
            return
        body = await bare_asgi.read_body(receive)
        header_length = dict(scope["headers"]).get(b"inference-header-content-length")
        if header_length is None:
            tensor = orjson.loads(body)["inputs"][0]
            x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        else:
            size = int(header_length)
            tensor = orjson.loads(body[:size])["inputs"][0]
            x = np.frombuffer(body, np.float32, offset=size).reshape(tensor["shape"])
        if not np.isfinite(x).all():
            raise ValueError("non-finite input")
        (y,) = session.run([output], {tensor["name"]: x})
        answer = {"name": output, "datatype": "FP32", "shape": list(y.shape)}
        headers = [(b"content-type", b"application/json")]
        if header_length is None:
            answer["data"] = y.reshape(-1)
            body = orjson.dumps({**prefix, "outputs": [answer]}, option=orjson.OPT_SERIALIZE_NUMPY)
        else:
            answer["parameters"] = {"binary_data_size": y.nbytes}
            head = orjson.dumps({**prefix, "outputs": [answer]})
            body = head + y.tobytes()
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", b"%d" % len(head)),
            ]
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def least_grpc_handler(model: Path):
    from tritonclient.grpc import service_pb2

    from service.protocol.grpc.codec import parse_infer

    session = SessionFactory().create(model)
    output = session.get_outputs()[0].name
    name, version = model.parent.parent.name, model.parent.name

    async def model_infer(request: bytes, context) -> bytes:
        # Parsed as bnserve parses it: the tensor a view of the message, as the HTTP mode's is
        # of the body (protobuf alone would copy it twice).
        parsed = parse_infer(request)
        tensor = parsed.message.inputs[0]
        x = np.frombuffer(parsed.raw[0], np.float32).reshape(tensor.shape)
        if not np.isfinite(x).all():
            raise ValueError("non-finite input")
        (y,) = session.run([output], {tensor.name: x})
        response = service_pb2.ModelInferResponse(model_name=name, model_version=version)
        response.outputs.add(name=output, datatype="FP32", shape=list(y.shape))
        response.raw_output_contents.append(y.tobytes())
        return response.SerializeToString()

    return model_infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    parser.add_argument("--grpc", action="store_true", help="answer ModelInfer over gRPC")
    args = parser.parse_args()
    bare_asgi.keep_freed_memory()  # as the floor does (and bnserve's heap does by itself)
    if args.grpc:
        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(bare_grpc.serve(args.host, args.port, least_grpc_handler(args.model)))
        return
    uvicorn.run(
        least_app(args.model), host=args.host, port=args.port, http="httptools", loop="uvloop",
        access_log=False, log_level="warning", server_header=False, date_header=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
