"""Where one digits request's time goes inside bnserve, stage by stage, in process (no sockets,
no client): the ASGI app driven directly on uvloop, then its parts on their own.

    python -m benchmarks.stages [--repository artifacts/overhead] [--count 3000]

Each line is the median over blocks of `count` calls; differences between lines are the cost of
a layer (full app minus decode + DataPlane.infer = the middleware and the REST endpoint; the
app with infer through FastAPI's routing shows what routing, dependency injection and
Request/Response objects would add). The socket and HTTP parsing cost is the floor that
benchmarks.overhead measures against.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import orjson
import uvloop

from benchmarks.overhead import digits_repository
from benchmarks.serving import json_body
from service.app import create_app
from service.config import Settings
from service.logs import configure_logging, fd_sink, shutdown_logging
from service.middleware import RequestContextMiddleware
from service.protocol.codec import decode_request, encode_response

ROOT = Path(__file__).resolve().parent.parent


def scope_for(path: str, headers: dict[str, str]) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip


def asgi_call(app, path: str, body: bytes, headers: dict[str, str]) -> Callable[[], Awaitable]:
    headers = {**headers, "content-length": str(len(body))}

    async def call() -> None:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        status = []

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope_for(path, headers), receive, send)
        if status != [200]:
            raise RuntimeError(f"{path}: {status}")

    return call


async def bare_app(scope, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def measure(stages: dict[str, Callable[[], Awaitable]], count: int, rounds: int) -> dict:
    results = {name: [] for name in stages}
    for call in stages.values():
        for _ in range(50):
            await call()
    for _ in range(rounds):
        for name, call in stages.items():
            started = time.perf_counter()
            for _ in range(count):
                await call()
            results[name].append((time.perf_counter() - started) / count)
    return {name: statistics.median(times) for name, times in results.items()}


async def run(repository: Path, count: int, rounds: int) -> None:
    # Access logs on, as in a served process, written to /dev/null by the background writer.
    configure_logging("json", "info", sink=fd_sink(os.open(os.devnull, os.O_WRONLY)))
    settings = Settings(repository=repository, poll_interval=0)
    app = create_app(settings)
    routed = create_app(settings, fast_infer=False)  # infer through FastAPI's routing
    async with app.router.lifespan_context(app), routed.router.lifespan_context(routed):
        s = app.state.services
        while not (s.ready and routed.state.services.ready):
            await asyncio.sleep(0.05)
        sample = next((repository / "digits" / "1" / "samples").glob("*.json"))
        tensor = orjson.loads(sample.read_bytes())["inputs"][0]
        digit = np.array(tensor["data"][:64], np.float32).reshape(1, 1, 8, 8)
        body, headers = json_body(digit, "images")
        model = s.registry.get("digits", None)
        request = decode_request("digits", None, body, None)
        checked = s.inference.validate(model, request)
        response = await s.infer(request)
        loop = asyncio.get_running_loop()

        async def infer():
            await s.infer(decode_request("digits", None, body, None))

        async def decode():
            decode_request("digits", None, body, None)

        async def validate():
            s.inference.validate(model, request)

        async def model_run():
            await model.run(checked.tensors, 1)

        async def run_sync():
            model.run_sync(checked.tensors)

        async def hop():
            await loop.run_in_executor(model.executor, model.run_sync, checked.tensors)

        async def encode():
            encode_response(response)

        middleware_only = RequestContextMiddleware(
            bare_app, max_body=s.settings.max_request_bytes, observer=s.observer,
            refusal=s.refusal,
        )  # fmt: skip
        path = "/v2/models/digits/infer"
        stages = {
            "full app (middleware + InferRoute)": asgi_call(app, path, body, headers),
            "full app, infer via FastAPI routing": asgi_call(routed, path, body, headers),
            "middleware alone (around a bare app)": asgi_call(middleware_only, path, body, headers),
            "decode_request + DataPlane.infer": infer,
            "  decode_request (parse JSON)": decode,
            "  validate (against the model)": validate,
            "  model.run (queue + thread hop + ORT)": model_run,
            "  model.run_sync (ORT in this thread)": run_sync,
            "  run_in_executor(run_sync) (hop, no queue)": hop,
            "  encode_response": encode,
        }
        medians = await measure(stages, count, rounds)
    shutdown_logging()
    print(f"\ndigits, one sample, JSON, in process ({count} calls x {rounds} blocks)")
    print(f"{'stage':<44} | {'µs / request':>12}")
    print("-" * 60)
    for stage, seconds in medians.items():
        print(f"{stage:<44} | {seconds * 1e6:12.1f}")
    framework = (
        medians["full app (middleware + InferRoute)"] - medians["decode_request + DataPlane.infer"]
    )
    print(f"{'= framework: full app - infer':<44} | {framework * 1e6:12.1f}")
    hop = (
        medians["  model.run (queue + thread hop + ORT)"]
        - medians["  model.run_sync (ORT in this thread)"]
    )
    print(f"{'= scheduler + thread hop: run - run_sync':<44} | {hop * 1e6:12.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "overhead")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    repository = digits_repository(args.repository)
    uvloop.run(run(repository, args.count, args.rounds))


if __name__ == "__main__":
    main()
