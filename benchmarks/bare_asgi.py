"""The floor for per-request overhead: a bare ASGI app on uvicorn + httptools + uvloop that
reads the whole request body and answers a fixed KServe v2 JSON body, nothing else.

    python -m benchmarks.bare_asgi --port 8100
"""

from __future__ import annotations

import argparse

import uvicorn

RESPONSE = (
    b'{"model_name":"digits","model_version":"1","outputs":[{"name":"logits","datatype":"FP32",'
    b'"shape":[1,10],"data":[-3.1,-2.2,0.4,9.8,-1.5,2.6,-4.7,1.8,0.9,-0.3]}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    b"".join(chunks)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(
        app, host=args.host, port=args.port, http="httptools", loop="uvloop",
        access_log=False, log_level="warning", server_header=False, date_header=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
