"""The floor for per-request overhead: a bare ASGI app on uvicorn + httptools + uvloop that
reads the whole request body and answers a fixed KServe v2 JSON body, nothing else.

    python -m benchmarks.bare_asgi --port 8100

It keeps freed memory at the top of its heap (`keep_freed_memory`), as bnserve's process does
by itself: otherwise glibc hands each request's 600 kB of body buffers back to the kernel and
the app pays ~260 page faults per request for them (0.94 vs 0.41-0.48 ms p50 here), a cost of this
tiny process's heap that bnserve does not have (0-2 faults per request, measured from
/proc/<pid>/stat), and the floor would be too high.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util

import uvicorn

RESPONSE = (
    b'{"model_name":"digits","model_version":"1","outputs":[{"name":"logits","datatype":"FP32",'
    b'"shape":[1,10],"data":[-3.1,-2.2,0.4,9.8,-1.5,2.6,-4.7,1.8,0.9,-0.3]}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())]


async def read_body(receive) -> bytes:
    """The whole request body, as every server must read it."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": RESPONSE})


M_TOP_PAD = -2  # glibc mallopt parameter: bytes kept free at the heap top after a trim


def keep_freed_memory(pad: int = 16 << 20) -> bool:
    """Have glibc keep `pad` bytes at the heap top instead of returning them; False where
    there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_TOP_PAD, pad))
    except (OSError, AttributeError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    keep_freed_memory()
    uvicorn.run(
        app, host=args.host, port=args.port, http="httptools", loop="uvloop",
        access_log=False, log_level="warning", server_header=False, date_header=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
