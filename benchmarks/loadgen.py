"""A closed-loop load generator, HTTP and gRPC: N clients, each with one request outstanding on
its own keep-alive connection, for a fixed time. Bodies are encoded once, up front."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    codes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> int:
        return self.codes.get(200, 0)

    def throughput(self, samples_per_request: int = 1) -> float:
        return self.ok * samples_per_request / self.seconds

    def merge(self, other: LoadResult) -> LoadResult:
        return LoadResult(
            seconds=self.seconds + other.seconds,
            latencies=self.latencies + other.latencies,
            codes=self.codes + other.codes,
            errors=self.errors + other.errors,
        )

    def percentile(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies) * 1000, q)) if self.latencies else 0.0


class _Window:
    """The measured window of one load run, shared by its client threads: responses that end
    inside it are counted (whenever their request started)."""

    def __init__(self, seconds: float, warmup: float) -> None:
        start = time.perf_counter()
        self.measure_from, self.stop_at = start + warmup, start + warmup + seconds
        self.result = LoadResult(seconds=seconds)
        self.lock = threading.Lock()

    def open(self) -> bool:
        """Whether a client should start another request."""
        return time.perf_counter() < self.stop_at

    def record(self, code, began: float) -> None:
        ended = time.perf_counter()
        if self.measure_from <= ended <= self.stop_at:
            with self.lock:
                self.result.codes[code] += 1
                if code == 200:
                    self.result.latencies.append(ended - began)

    def error(self, name: str) -> None:
        """A client-side error (no HTTP status), counted when it happens inside the window."""
        if self.measure_from <= time.perf_counter() <= self.stop_at:
            with self.lock:
                self.result.errors[name] += 1

    def run(self, clients: int, client) -> LoadResult:
        """`client` on `clients` threads at once, until all have stopped."""
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return self.result


def run_load(
    url: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    clients: int,
    seconds: float,
    warmup: float = 2.0,
    honor_retry_after: bool = False,
) -> LoadResult:
    """Responses that arrive between the end of the warm-up and the end are counted, whenever
    their request started: in steady state that is the throughput, with no edge bias of one
    latency per client at either end of the window.
    With honor_retry_after, a client answered 503 waits as its Retry-After header says, as
    well-behaved clients do; without, it retries at once (a retry storm)."""
    parts = urlsplit(url)
    window = _Window(seconds, warmup)

    def client() -> None:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while window.open():
            began = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                response.read()
                code = response.status
                retry_after = response.getheader("retry-after")
                if response.getheader("connection", "").lower() == "close":
                    connection.close()
            except (OSError, http.client.HTTPException) as exc:
                code = None
                connection.close()
                window.error(type(exc).__name__)
                time.sleep(0.01)
            if code is not None:
                window.record(code, began)
            if honor_retry_after and code == 503 and retry_after:
                time.sleep(min(float(retry_after), max(window.stop_at - time.perf_counter(), 0)))
        connection.close()

    return window.run(clients, client)


GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"


def grpc_request(x: np.ndarray, input_name: str, model: str) -> bytes:
    """A ModelInferRequest with raw tensor bytes, serialized once (Triton's own messages)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


def grpc_caller(address: str):
    """ModelInfer taking and returning serialized bytes on one channel (one HTTP/2 connection)."""
    import grpc

    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])
    return channel, channel.unary_unary(GRPC_INFER)


def run_grpc_load(
    address: str,
    request: bytes,
    *,
    clients: int,
    seconds: float,
    warmup: float = 2.0,
    bare: bool = False,
) -> LoadResult:
    """run_load's closed loop over gRPC: each client has its own channel; OK counts as 200.
    bare: each client is a benchmarks.h2client connection instead of a grpcio channel, the
    counterpart of run_load's http.client (grpcio's client spends more CPU per call, on the
    cores the server needs); a call that answers no message counts as FAILED."""
    import grpc

    from benchmarks.h2client import CallFailed, GrpcConnection

    window = _Window(seconds, warmup)

    def client() -> None:
        if bare:
            host, port = address.rsplit(":", 1)
            connection = GrpcConnection(host, int(port))
            close = connection.close

            def call(message: bytes, timeout: float) -> bytes:
                return connection.unary(GRPC_INFER, message, timeout=timeout)
        else:
            channel, call = grpc_caller(address)
            close = channel.close
        while window.open():
            began = time.perf_counter()
            try:
                call(request, timeout=60)
                code = 200
            except grpc.RpcError as exc:
                code = exc.code().name
            except (CallFailed, OSError):
                code = "FAILED"
            window.record(code, began)
        close()

    return window.run(clients, client)
