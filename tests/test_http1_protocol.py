"""POST .../infer answered by the HTTP protocol itself (service.protocol.http1) answers exactly
as the ASGI path does, and keeps HTTP/1.1's promises.

The oracle is the same service with BNSERVE_HTTP_FAST_INFER=false (every request through the
ASGI app). Three real servers on 127.0.0.1: the protocol path with the digits model running on
the event loop, the protocol path with every run queued to the model's thread
(BNSERVE_INLINE_RUN_US=0: the answer comes from a future), and the oracle. Requests go over raw
sockets, so pipelining, keep-alive, split bodies and clients that leave can be checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import time

import numpy as np
import orjson
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from uvicorn.server import ServerState

from service.app import create_app
from service.config import Settings
from service.errors import Unavailable
from service.launcher import ServiceProcess
from service.protocol.http1 import Http1Protocol, InferCall
from tests.test_service_fast_path import CASES, INFER, tensor

LIMIT = 64 * 1024  # as test_service_fast_path's clients, so its 65 kB case is a 413


@pytest.fixture(scope="module")
def servers(demo_repository):
    base = {"BNSERVE_MAX_REQUEST_BYTES": str(LIMIT), "BNSERVE_DRAIN_DELAY": "0"}
    configs = {
        "inline": base,
        "queued": base | {"BNSERVE_INLINE_RUN_US": "0"},
        "asgi": base | {"BNSERVE_HTTP_FAST_INFER": "false"},
    }
    started = {}
    try:
        for name, env in configs.items():
            started[name] = ServiceProcess(demo_repository, "--grpc-port", "0", env=env)
        for server in started.values():
            server.wait_ready()
        warm = request_bytes(INFER, orjson.dumps({"inputs": [tensor()]}))
        for _ in range(40):  # timed runs: the inline server then runs digits on the loop
            exchange(started["inline"], warm)
        yield started
    finally:
        for server in started.values():
            server.stop()


def request_bytes(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Reader:
    """Reads HTTP/1.1 responses (each with a content-length, as this server sends them) off
    one socket, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed mid-response: {self.buffer!r}"
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, value = line.split(":", 1)
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            assert self._fill(), "connection closed mid-body"
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, body

    def closed(self) -> bool:
        """True when the server closed the connection (nothing more to read). A server that
        closes with request bytes unread (a 413 before the body) makes the kernel reset it."""
        self.sock.settimeout(5)
        try:
            return not self.buffer and not self._fill()
        except ConnectionResetError:
            return not self.buffer


def connect(server: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def exchange(server: ServiceProcess, *requests: bytes) -> list[tuple[int, dict, bytes]]:
    """Send the requests in one write (pipelined) and read their answers."""
    with connect(server) as sock:
        sock.sendall(b"".join(requests))
        reader = Reader(sock)
        return [reader.response() for _ in requests]


COMPARED = ("content-type", "inference-header-content-length", "retry-after", "connection")
EXTRA_CASES = [
    (INFER, orjson.dumps({"inputs": [tensor()]}), {"connection": "close"}),
    (INFER, orjson.dumps({"inputs": [tensor()]}), {"content-encoding": "identity"}),
    (INFER, orjson.dumps({"inputs": [tensor()]}), {"x-request-id": "not a safe id!"}),
    ("/v2/models/digi%74s/infer", orjson.dumps({"inputs": [tensor()]}), {}),
    (INFER, b"", {}),
]


@pytest.mark.parametrize("case", range(len(CASES) + len(EXTRA_CASES)))
def test_answers_are_the_asgi_paths(servers, case):
    path, body, headers = (CASES + EXTRA_CASES)[case]
    headers = {"x-request-id": f"case-{case}", **headers}
    answers = {
        name: exchange(server, request_bytes(path, body, headers))[0]
        for name, server in servers.items()
    }
    status, oracle_headers, oracle_body = answers["asgi"]
    assert status != 500, oracle_body
    for name in ("inline", "queued"):
        got_status, got_headers, got_body = answers[name]
        assert (got_status, got_body) == (status, oracle_body), name
        for header in COMPARED:
            assert got_headers.get(header) == oracle_headers.get(header), (name, header)
        if headers["x-request-id"] == f"case-{case}":
            assert got_headers["x-request-id"] == f"case-{case}"
        else:  # not a safe token: a fresh id instead
            assert len(got_headers["x-request-id"]) == 32


def test_pipelined_requests_are_answered_in_order(servers):
    good = orjson.dumps({"inputs": [tensor(data=list(np.linspace(0, 1, 64).tolist()))]})
    requests = [
        request_bytes(INFER, good, {"x-request-id": "first"}),
        b"GET /v2/models/digits HTTP/1.1\r\nhost: x\r\nx-request-id: second\r\n\r\n",
        request_bytes(INFER, gzip.compress(good), {"content-encoding": "gzip", "x-request-id": "third"}),
        request_bytes(INFER, b"{oops", {"x-request-id": "fourth"}),
        request_bytes(INFER, good, {"x-request-id": "fifth"}),
    ]  # fmt: skip
    # A bad request right behind a good one: answered at once, it must still wait its turn.
    back_to_back = [requests[0], requests[3], requests[4]]
    for sequence in (requests, back_to_back):
        expected = exchange(servers["asgi"], *sequence)
        ids = [h["x-request-id"] for _, h, _ in expected]
        assert [s for s, _, _ in expected] == [200 if i != "fourth" else 400 for i in ids]
        for name in ("inline", "queued"):
            for _ in range(3):
                got = exchange(servers[name], *sequence)
                assert [h["x-request-id"] for _, h, _ in got] == ids, name
                assert [(s, b) for s, _, b in got] == [(s, b) for s, _, b in expected], name


@pytest.fixture(scope="module")
def oracle(servers) -> dict[int, tuple[int, bytes, dict[str, str]]]:
    """The ASGI path's answer to each case, by case number."""
    answers = {}
    for number, (path, body, headers) in enumerate(CASES + EXTRA_CASES):
        status, got_headers, content = exchange(
            servers["asgi"], request_bytes(path, body, headers)
        )[0]
        answers[number] = (status, content, got_headers)
    return answers


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_pipelines_in_random_pieces_get_the_asgi_answers(servers, oracle, data):
    """Randomized: a pipeline of requests, good and bad, sent in pieces cut at random bytes,
    to both protocol-path servers: each answer, in order, is the ASGI path's (status, body,
    headers); one that closes the connection may end the pipeline, and then nothing follows."""
    open_cases = sorted(n for n, (_, _, h) in oracle.items() if h.get("connection") != "close")
    closing = sorted(set(oracle) - set(open_cases))
    cases = data.draw(st.lists(st.sampled_from(open_cases), min_size=1, max_size=4))
    cases += data.draw(st.lists(st.sampled_from(closing), max_size=1))
    requests = []
    for position, number in enumerate(cases):
        path, body, headers = (CASES + EXTRA_CASES)[number]
        requests.append(request_bytes(path, body, {**headers, "x-request-id": f"p{position}"}))
    raw = b"".join(requests)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=6)))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    for name in ("inline", "queued"):
        with connect(servers[name]) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for piece in pieces:
                try:
                    sock.sendall(piece)
                except OSError:  # closed after a 413 or refusal: the rest is not read
                    break
                time.sleep(0.001)
            reader = Reader(sock)
            for position, number in enumerate(cases):
                status, headers, content = reader.response()
                expected_status, expected_content, expected_headers = oracle[number]
                assert headers["x-request-id"] == f"p{position}", name
                assert (status, content) == (expected_status, expected_content), (name, number)
                for header in COMPARED:
                    assert headers.get(header) == expected_headers.get(header), (name, header)
            if cases[-1] in closing:
                assert reader.closed(), f"{name}: open after a closing answer"


def test_keep_alive_then_connection_close(servers):
    body = orjson.dumps({"inputs": [tensor()]})
    for name in ("inline", "queued"):
        with connect(servers[name]) as sock:
            reader = Reader(sock)
            for i in range(40):
                sock.sendall(request_bytes(INFER, body, {"x-request-id": f"r{i}"}))
                status, headers, _ = reader.response()
                assert (status, headers["x-request-id"]) == (200, f"r{i}")
                assert "connection" not in headers
            sock.sendall(request_bytes(INFER, body, {"connection": "close"}))
            status, headers, _ = reader.response()
            assert (status, headers["connection"]) == (200, "close")
            assert reader.closed(), f"{name}: the server kept the connection open"


def test_body_arriving_in_small_pieces(servers):
    body = orjson.dumps({"inputs": [tensor(data=list(np.linspace(-1, 1, 64).tolist()))]})
    whole = exchange(servers["asgi"], request_bytes(INFER, body))[0]
    raw = request_bytes(INFER, body)
    for name in ("inline", "queued"):
        with connect(servers[name]) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(raw), 97):
                sock.sendall(raw[start : start + 97])
                time.sleep(0.002)
            status, _, got = Reader(sock).response()
        assert (status, got) == (whole[0], whole[2]), name


def test_clients_that_leave_before_the_answer_do_not_hurt_the_server(servers):
    server = servers["queued"]  # the answer comes from a future, after the client left
    body = orjson.dumps({"inputs": [tensor()]})
    for _ in range(20):
        with connect(server) as sock:
            sock.sendall(request_bytes(INFER, body))
        with connect(server) as sock:  # a body that never ends
            sock.sendall(request_bytes(INFER, body)[:-10])
    time.sleep(0.5)
    assert exchange(server, request_bytes(INFER, body))[0][0] == 200
    metrics = exchange(server, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")[0][2].decode()
    assert "bnserve_requests_in_flight 1.0" in metrics  # the scrape itself: nothing leaked
    left = [line for line in metrics.splitlines() if 'code="499"' in line]
    assert left, "the clients that left mid-body are not counted"
    assert left[0].startswith("bnserve_requests_total"), left
    assert left[0].endswith(" 20.0"), left
    log = server.output()
    assert "Traceback" not in log, log[-3000:]
    assert '"level":"error"' not in log, log[-3000:]


class Transport(asyncio.Transport):
    """What the protocol writes, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5000)}.get(name)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@contextlib.asynccontextmanager
async def running(settings: Settings):
    """The app with its lifespan started and its repository loaded, in this event loop."""
    app = create_app(settings)
    startup: asyncio.Queue = asyncio.Queue()
    sent: asyncio.Queue = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan"}, startup.get, sent.put))
    assert (await sent.get())["type"] == "lifespan.startup.complete"
    while not app.state.services.ready:
        await asyncio.sleep(0.02)
    try:
        yield app
    finally:
        await startup.put({"type": "lifespan.shutdown"})
        await lifespan


def test_plain_infer_requests_skip_the_asgi_cycle(demo_repository):
    """In process: a tiny model's request is answered inside the protocol's data_received, in
    one write, with no ASGI task; a compressed one goes through the ASGI app."""
    body = orjson.dumps({"inputs": [tensor()]})
    plain = request_bytes(INFER, body, {"x-request-id": "plain"})
    compressed = request_bytes(INFER, gzip.compress(body), {"content-encoding": "gzip"})

    async def scenario() -> None:
        async with running(Settings(repository=demo_repository, grpc_port=0)) as app:
            await exercise(app)

    async def exercise(app) -> None:
        config = uvicorn.Config(app, http=Http1Protocol, log_config=None)
        config.load()
        state = ServerState()
        protocol = Http1Protocol(config, state, {})
        transport = Transport()
        protocol.connection_made(transport)

        async def answered(raw: bytes) -> bytes:
            count = len(transport.written)
            protocol.data_received(raw)
            while len(transport.written) == count:
                await asyncio.sleep(0.001)
            return b"".join(transport.written[count:])

        for _ in range(50):  # until the scheduler has timed enough runs to run it inline
            await answered(plain)
        count = len(transport.written)
        protocol.data_received(plain)
        assert len(transport.written) == count + 1, "not answered within data_received"
        assert not state.tasks
        assert isinstance(protocol.cycle, InferCall)
        assert protocol.cycle.response_complete
        head, _ = transport.written[-1].split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"x-request-id: plain" in head

        protocol.data_received(compressed)
        assert state.tasks, "a compressed body should go through the ASGI app"
        assert (await answered(b"")).startswith(b"HTTP/1.1 200 OK")
        await asyncio.sleep(0.01)  # the ASGI path's body write

        # Answered inline, then a request for the ASGI app in the same read: the keep-alive
        # timer armed by the first answer must not run over the second.
        protocol.data_received(plain + compressed)
        assert state.tasks
        assert protocol.timeout_keep_alive_task is None
        while state.tasks:
            await asyncio.sleep(0.001)

        # A client that does not read its answers: the ASGI path, which waits for the drain.
        protocol.pause_writing()
        protocol.data_received(plain)
        assert state.tasks, "with writing paused the protocol should not answer by itself"
        protocol.resume_writing()
        while state.tasks:
            await asyncio.sleep(0.001)
        # Refused at its headers (503, connection closed): a request behind it in the same
        # read is not started.
        plane = app.state.services
        plane.refusal = lambda name, version: Unavailable("queue full (test)")
        count = len(transport.written)
        protocol.data_received(plain + b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        await asyncio.sleep(0.05)
        assert len(transport.written) == count + 1
        assert transport.written[-1].startswith(b"HTTP/1.1 503 ")
        assert b"connection: close" in transport.written[-1]
        assert transport.closing
        assert not state.tasks
        protocol.connection_lost(None)

    asyncio.run(scenario())


def test_content_length_of_thousands_of_digits_is_no_crash(servers):
    """int() refuses strings over 4300 digits: a Content-Length of 5000 leading zeros and a
    5 must still frame a 5-byte body (here not JSON: 400), on every path."""
    head = f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-length: {'0' * 5000}5\r\n\r\n"
    for name, server in servers.items():
        status, _, body = exchange(server, head.encode() + b"{oops")[0]
        assert status == 400, (name, status, body)
        assert b"not valid JSON" in body, (name, body)


def test_queued_requests_release_their_model_version(demo_repository):
    """A queued request holds its model version (a retired version closes after its last
    user) until its run is over: answered, failed, or cancelled, through `infer_now`'s future
    or `infer`'s coroutine."""
    from service.dataplane.types import InferRequest, InputTensor
    from service.errors import BadRequest

    def request(data) -> InferRequest:
        return InferRequest(
            "digits", None, [InputTensor("images", "FP32", [1, 1, 8, 8], data=data)]
        )

    good, bad = request(np.zeros(64, np.float64)), request(np.full(64, np.nan))

    async def scenario() -> None:
        settings = Settings(repository=demo_repository, grpc_port=0, inline_run_us=0)
        async with running(settings) as app:
            await exercise(app.state.services)

    async def exercise(plane) -> None:
        model = plane.registry.get("digits", None)

        answered = plane.infer_now(good)
        assert isinstance(answered, asyncio.Future)  # inline runs are off: queued
        assert model._users == 1
        assert (await answered).outputs[0].array.shape == (1, 10)
        cancelled = plane.infer_now(good)
        cancelled.cancel()
        with pytest.raises(BadRequest, match="NaN or Inf"):
            plane.infer_now(bad)
        waiting = asyncio.ensure_future(plane.infer(good))
        await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(cancelled, waiting, return_exceptions=True)
        await asyncio.sleep(0.05)
        assert model._users == 0

    asyncio.run(scenario())
