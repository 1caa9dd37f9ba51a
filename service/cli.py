"""python -m service: serve the model repository with uvicorn (REST) and, in the same process
and event loop, grpcio's asyncio server (gRPC).

Flags override BNSERVE_ environment variables, which override defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .capture import CaptureDirError
from .config import Settings
from .logs import configure_logging, shutdown_logging
from .protocol.http1 import Http1Protocol
from .state import Services

log = logging.getLogger("bnserve.server")


def parse(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Serve a bnserve model repository over KServe v2 (ONNX Runtime).",
    )
    parser.add_argument("--repository", help="model repository folder (BNSERVE_REPOSITORY)")
    parser.add_argument("--host", help="address to bind (BNSERVE_HOST)")
    parser.add_argument("--port", type=int, help="port (BNSERVE_PORT)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port, 0 = off (BNSERVE_GRPC_PORT)")
    parser.add_argument("--providers", choices=["auto", "cuda", "cpu"], help="BNSERVE_PROVIDERS")
    parser.add_argument("--version-policy", help="latest | all | specific:1,2")
    parser.add_argument("--poll-interval", type=float, help="seconds; 0 = no polling")
    parser.add_argument("--log-format", choices=["json", "text"])
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return Settings(**overrides)


class DrainingServer(uvicorn.Server):
    """SIGTERM first turns readiness false (REST and gRPC) and keeps serving for drain_delay
    seconds (so load balancers stop sending), then closes both listeners and lets accepted
    requests and calls finish within graceful_timeout; the process then exits 0. A second
    SIGTERM, or a Ctrl-C, ends the drain delay at once; a Ctrl-C while the listeners are
    closed and calls drain (a second one, during a drain delay) stops waiting for them: uvicorn
    stops waiting for its requests, and the gRPC calls still in flight are cancelled."""

    def __init__(self, config: uvicorn.Config, services: Services, drain_delay: float) -> None:
        super().__init__(config)
        self.services = services
        self.drain_delay = drain_delay
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_started is None and sig == signal.SIGTERM and self.drain_delay > 0:
            self.services.draining = True
            self.drain_started = time.monotonic()
            log.info("SIGTERM: not ready; closing in %.1f s", self.drain_delay)
            return
        self.services.draining = True
        if sig == signal.SIGTERM:
            # A stop, not an interruption: uvicorn would re-raise any SIGTERM it captured once
            # shut down (exit 143, before the log queue is flushed); the drain ends with exit 0.
            self.should_exit = True
            return
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        """Stop gRPC from taking new calls when HTTP stops, and drain both at once."""
        grpc_server = getattr(self.config.app.state, "grpc", None)
        if grpc_server is None:
            await super().shutdown(sockets)
            return
        stopping = asyncio.ensure_future(grpc_server.stop(self.config.timeout_graceful_shutdown))
        # Beside uvicorn's shutdown, which waits in the app's lifespan for this same stop.
        watching = asyncio.ensure_future(self._cancel_calls_on_force_exit(grpc_server, stopping))
        try:
            await super().shutdown(sockets)
            await stopping
        finally:
            watching.cancel()

    async def _cancel_calls_on_force_exit(self, grpc_server, stopping: asyncio.Future) -> None:
        """uvicorn cuts its own waits short on a second SIGINT (force_exit); so does gRPC."""
        while not stopping.done():
            if self.force_exit:
                try:
                    await grpc_server.stop_now()
                except Exception:  # the graceful stop still ends it, at the grace period
                    log.exception("cancelling the gRPC calls in flight failed")
                return
            await asyncio.wait({stopping}, timeout=0.1)

    async def on_tick(self, counter: int) -> bool:
        started = self.drain_started
        if started is not None and time.monotonic() - started >= self.drain_delay:
            self.should_exit = True  # only ever set: a signal may have set it meanwhile
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse(argv)
    except ValidationError as exc:  # a bad BNSERVE_ value: one line naming it, not a traceback
        problems = "; ".join(
            f"BNSERVE_{'_'.join(str(p) for p in e['loc']).upper()}={e.get('input')!r}: {e['msg']}"
            for e in exc.errors()
        )
        print(f"bnserve: invalid setting {problems}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level, settings.log_queue_size)
    try:
        app = create_app(settings, grpc=True)
    except CaptureDirError as exc:  # a capture folder that cannot be written
        print(f"bnserve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout,
        limit_concurrency=settings.max_connections,
        server_header=False,
        http=Http1Protocol,  # uvicorn's httptools protocol, answering plain infer requests
    )
    try:
        DrainingServer(config, app.state.services, settings.drain_delay).run()
    finally:
        shutdown_logging()  # flush, bounded: a stalled sink cannot hold the exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
