"""HTTP/1.1 for the REST API: uvicorn's httptools protocol, with POST .../infer answered by
the protocol itself instead of through an ASGI request cycle.

A small model's request costs less than the ASGI machinery around it: a request-cycle
object, a task, the body handed over chunk by chunk through an event, the status line and
headers written apart from the body. Here an infer request whose body has arrived is decoded
and, when the model runs on the event loop, answered in the same callback, in one write;
otherwise its queued run's future answers when done. Everything else, and every infer request
that is not plain (chunked or compressed body, Expect: 100-continue, a body over the limit, a
percent-encoded path, a connection with a request in progress, a client whose answers are not
being read), goes through the ASGI app as before, which answers the same way. Set
BNSERVE_HTTP_FAST_INFER=false to send all through it.

The answers are the ASGI endpoint's (routers.infer.answer_of); the request id, early 503,
metrics and access line are the middleware's. A client that leaves before its body is in is
recorded with status 499.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..dataplane.observe import CallObserver
from ..dataplane.plane import DataPlane
from ..dataplane.types import InferResponse
from ..errors import Unavailable
from ..logs import RequestIdScope
from ..middleware import INFERENCE_PATH, declared_size, request_id_for
from ..routers.infer import Answer, InferRoute, answer_of, start_infer

log = logging.getLogger("bnserve.http")
# The status recorded (metrics, access log) for a request whose client left before its body
# was in: nginx's "client closed request".
CLIENT_CLOSED = 499


class _NoEvent:
    """uvicorn sets its cycle's body event on disconnect; nothing waits on this one."""

    def set(self) -> None:
        pass


@dataclass(slots=True, eq=False)
class InferCall:
    """One infer request the protocol answers itself. Until answered it stands in for
    uvicorn's request cycle (`protocol.cycle`), so pipelined requests queue behind it, a
    graceful shutdown lets it finish and closes the connection after it, and a disconnect
    marks it."""

    model: str
    version: str | None
    path: str
    header_length: str | None
    supplied_id: bytes
    keep_alive: bool
    request_id: str = ""
    started: float = 0.0
    response_complete: bool = False
    disconnected: bool = False
    message_event = _NoEvent()


class InferOnWire:
    """What the protocol needs of the service for infer requests: which ones it may answer,
    and their answers."""

    def __init__(self, plane: DataPlane, max_body: int) -> None:
        self.plane = plane
        self.max_body = max_body
        self.observer: CallObserver = plane.observer
        self.templates = InferRoute.templates

    def accept(self, url: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool):
        """An InferCall for a plain POST .../infer (the method was checked), else None."""
        if b"%" in url or not url.isascii():  # the ASGI path unquotes (or refuses) it
            return None
        match = INFERENCE_PATH.match(url.decode("latin-1"))
        if match is None or match["action"] != "infer":
            return None
        length = header_length = None
        supplied = b""
        for name, value in headers:  # names are lower case (uvicorn)
            if name == b"content-length":
                length = value
            elif name == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif name == b"x-request-id":
                supplied = value
            elif name == b"content-encoding":
                if value.strip().lower() not in (b"", b"identity"):
                    return None
            elif name in (b"transfer-encoding", b"expect"):
                return None
        if length is None or not length.isdigit() or declared_size(length) > self.max_body:
            return None  # no length (chunked), or over the limit: the ASGI path answers 413
        return InferCall(
            match["model"], match["version"], match.string, header_length, supplied, keep_alive
        )

    def begin(self, call: InferCall) -> Answer | None:
        """Start the call (request id, in-flight count, timing) when its headers are in; the
        503 for a request the data plane would refuse now (answered before its body is read,
        as the middleware does), else None."""
        call.request_id = request_id_for(call.supplied_id)
        call.started = self.observer.started()
        with RequestIdScope(call.request_id):
            try:
                refusal = self.plane.refusal(call.model, call.version)
            except Exception as exc:
                return answer_of(exc)
        if refusal is None:
            return None
        call.keep_alive = False  # the body is not read: the connection ends with the answer
        return answer_of(refusal)

    def respond(self, call: InferCall, body: bytes) -> Answer | asyncio.Future:
        """The answer, or a future of the data plane's response for a queued run (then
        `answer_later`)."""
        with RequestIdScope(call.request_id):
            try:
                result = start_infer(self.plane, call.model, call.version, body, call.header_length)
            except Exception as exc:
                return answer_of(exc)
            return answer_of(result) if isinstance(result, InferResponse) else result

    def answer_later(self, call: InferCall, future: asyncio.Future) -> Answer:
        with RequestIdScope(call.request_id):  # for the log of an unexpected error
            if future.cancelled():  # by uvicorn past the graceful shutdown's timeout, or unload
                return answer_of(
                    Unavailable("the request was cancelled before its run ended; retry")
                )
            exception = future.exception()
            return answer_of(exception if exception is not None else future.result())

    def finished(self, call: InferCall, status: int) -> None:
        with RequestIdScope(call.request_id):
            self.observer.finished(
                call.started,
                endpoint=self.templates[call.version is not None],
                model=call.model,
                code=status,
                method="POST",
                path=call.path,
            )


class Http1Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; POST .../infer answered here (see the module's doc).
    Takes the app's `wire` (an InferOnWire, or None: plain uvicorn)."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.wire: InferOnWire | None = getattr(config.app, "wire", None)
        self.call: InferCall | None = None  # being received
        self.chunks: list[bytes] = []

    def on_headers_complete(self) -> None:
        # uvicorn clears the keep-alive timer when data arrives; an answer written while the
        # same data is still being parsed armed it again, and the next request must not run
        # under it.
        self._unset_keepalive_if_required()
        if self.transport.is_closing():
            # A refusal closed the connection while requests behind it were in the same read:
            # they are not started (the completed call stays the cycle; uvicorn skips bodies).
            return
        call = None
        if self.wire is not None and self._plain_post():
            call = self.wire.accept(self.url, self.headers, self.parser.should_keep_alive())
        if call is None:
            super().on_headers_complete()
            return
        self.cycle = call  # type: ignore[assignment]  # see InferCall
        self.chunks = []
        refused = self.wire.begin(call)
        if refused is None:
            self.call = call
        else:  # the rest of the body is ignored: uvicorn skips a completed cycle's body
            self._answer(call, refused)

    def _plain_post(self) -> bool:
        """A request that may be answered here: POST over HTTP/1.1, no upgrade, nothing in
        progress or queued on the connection, a client that reads its answers (else the ASGI
        path waits for the write buffer to drain), within uvicorn's concurrency limit."""
        if self.parser.get_method() != b"POST" or self.parser.get_http_version() != "1.1":
            return False
        if self.flow.write_paused:
            return False
        if self.parser.should_upgrade() or self.pipeline:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False
        limit = self.limit_concurrency
        return limit is None or (len(self.connections) < limit and len(self.tasks) < limit)

    def on_body(self, body: bytes) -> None:
        if self.call is None:
            super().on_body(body)
        else:
            self.chunks.append(body)

    def on_message_complete(self) -> None:
        call = self.call
        if call is None:
            super().on_message_complete()
            return
        self.call = None
        body = b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0]
        self.chunks = []
        result = self.wire.respond(call, body)
        if isinstance(result, Answer):
            self._answer(call, result)
            return
        # A queued run: graceful shutdown waits for it (uvicorn waits for its tasks).
        self.tasks.add(result)
        result.add_done_callback(self.tasks.discard)
        result.add_done_callback(
            lambda done: self._answer(call, self.wire.answer_later(call, done))
        )

    def _answer(self, call: InferCall, answer: Answer) -> None:
        call.response_complete = True
        try:
            if not call.disconnected and not self.transport.is_closing():
                self.transport.write(self._response(call, answer))
                if not call.keep_alive:
                    self.transport.close()
        except Exception:  # never leave the connection waiting for an answer
            log.exception("writing an infer answer failed")
            self.transport.close()
        finally:
            self.wire.finished(call, answer.status)
            self.on_response_complete()  # uvicorn: next pipelined request, or keep-alive timer

    def connection_lost(self, exc: Exception | None) -> None:
        call, self.call = self.call, None
        if call is not None:  # left before its body was in: never answered
            call.response_complete = True
            self.wire.finished(call, CLIENT_CLOSED)
        super().connection_lost(exc)

    def _response(self, call: InferCall, answer: Answer) -> bytes:
        parts = [STATUS_LINE[answer.status]]
        for name, value in self.server_state.default_headers:
            parts += (name, b": ", value, b"\r\n")
        parts.append(b"content-length: %d\r\n" % len(answer.content))
        if answer.media_type is not None:
            parts += (b"content-type: ", answer.media_type.encode(), b"\r\n")
        for name, value in answer.headers.items():
            parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        parts += (b"x-request-id: ", call.request_id.encode(), b"\r\n")
        if not call.keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", answer.content)
        return b"".join(parts)
