"""A reference server (the bare ASGI app, the bare gRPC server, the least-Python server) as a
child process on 127.0.0.1, for the benchmarks to measure bnserve against."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.h2client import GrpcConnection
from service.launcher import ROOT, free_port


class BareServer:
    """benchmarks/bare_asgi.py (or another reference app taking --port) in a child process."""

    def __init__(
        self,
        module: str = "benchmarks.bare_asgi",
        *arguments: str,
        probe: Callable[[int], object] | None = None,
    ) -> None:
        """Start it and wait until `probe(port)` (default: an HTTP GET) stops raising OSError."""
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *arguments, "--port", str(self.port)],
            cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                (probe or http_get)(self.port)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{module} did not start") from None
                time.sleep(0.1)
            except BaseException:  # a probe's other error, or Ctrl-C: no child left behind
                self.stop()
                raise

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> BareServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def grpc_listening(port: int) -> None:
    """A probe for a gRPC reference: its port takes connections."""
    GrpcConnection("127.0.0.1", port, timeout=2).close()


def http_get(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/")
        connection.getresponse().read()
    finally:
        connection.close()


def poster(port: int, path: str, body: bytes, headers: dict) -> Callable[[], None]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post() -> None:
        for attempt in (1, 2):
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected):
                # uvicorn closes connections idle for 5 s (while other ways take their turn)
                connection.close()
                if attempt == 2:
                    raise
        response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}")

    return post
