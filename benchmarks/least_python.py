"""The least work any Python server on this stack does for a v2 JSON request: a second floor
for benchmarks.overhead, between the bare ASGI app (no work) and bnserve (all its checks).

    python -m benchmarks.least_python --model artifacts/overhead/digits/1/model.onnx --port 8101

On the same uvicorn + httptools + uvloop as the floor, per request: read the body, parse it
with orjson, the first input's `data` to a float32 array of its `shape`, refuse NaN/Inf, run
the ONNX Runtime session bnserve would make (service.runtime.SessionFactory), answer the
first output as v2 JSON. No request id, limits, metrics, statistics, logs, or any check
beyond the finite one, so it answers only well-formed requests for a one-input model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import orjson
import uvicorn

from benchmarks import bare_asgi
from service.runtime import SessionFactory


def least_app(model: Path):
    session = SessionFactory("cpu").create(model)
    output = session.get_outputs()[0].name
    prefix = {"model_name": model.parent.parent.name, "model_version": model.parent.name}

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":  # lifespan, readiness probes
            await bare_asgi.app(scope, receive, send)
            return
        tensor = orjson.loads(await bare_asgi.read_body(receive))["inputs"][0]
        x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
        if not np.isfinite(x).all():
            raise ValueError("non-finite input")
        (y,) = session.run([output], {tensor["name"]: x})
        body = orjson.dumps(
            {**prefix, "outputs": [
                {"name": output, "datatype": "FP32", "shape": list(y.shape), "data": y.reshape(-1)}
            ]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )  # fmt: skip
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args()
    bare_asgi.keep_freed_memory()  # as the floor does (and bnserve's heap does by itself)
    uvicorn.run(
        least_app(args.model), host=args.host, port=args.port, http="httptools", loop="uvloop",
        access_log=False, log_level="warning", server_header=False, date_header=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
