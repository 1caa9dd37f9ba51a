"""grpcio's asyncio server beside uvicorn: same process, same event loop, same data plane."""

from __future__ import annotations

import asyncio
import logging

import grpc

from ...dataplane.plane import DataPlane
from .servicer import Servicer

log = logging.getLogger("bnserve.grpc")
# grpcio refuses larger messages itself (RESOURCE_EXHAUSTED); up to this the servicer does,
# with the same message REST gives for 413.
CORE_LIMIT_SLACK = 1024 * 1024


def server_options(max_request_bytes: int, max_connections: int) -> list[tuple[str, int]]:
    """grpcio's server options for bnserve (benchmarks.bare_grpc, the gRPC floor, uses them
    too, so the floor's transport is bnserve's)."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes + CORE_LIMIT_SLACK),
        ("grpc.max_send_message_length", -1),
        ("grpc.max_concurrent_streams", max_connections),
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        settings = plane.settings
        host = f"[{settings.host}]" if ":" in settings.host else settings.host  # IPv6
        self.address = f"{host}:{settings.grpc_port}"
        self.server = grpc.aio.server(
            options=server_options(settings.max_request_bytes, settings.max_connections)
        )
        self.server.add_generic_rpc_handlers((Servicer(plane).handlers(),))
        self._stopping: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            self.port = self.server.add_insecure_port(self.address)
        except RuntimeError as exc:
            raise RuntimeError(f"gRPC cannot listen on {self.address}: {exc}") from None
        await self.server.start()
        log.info("gRPC listening on %s", self.address)

    async def stop(self, grace: float) -> None:
        """Refuse new calls; let those in flight finish within `grace` seconds. Idempotent: the
        shutdown starts it beside uvicorn's drain, the app's lifespan waits for it."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.shield(self._stopping)

    async def stop_now(self) -> None:
        """Cancel the calls still in flight (a second signal); a graceful stop ends with it."""
        await self.server.stop(0)
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
