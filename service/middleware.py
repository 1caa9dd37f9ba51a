"""One pure-ASGI middleware for what every request needs: a request id, the body size limit
(413, checked before and while reading, decompressed size included), an access log line and
the request metrics. Pure ASGI keeps the per-request cost to a few microseconds."""

from __future__ import annotations

import logging
import re
import time
import uuid
import zlib
from collections.abc import Callable

import orjson

from .errors import ServiceError
from .logs import request_id
from .metrics import Metrics

log = logging.getLogger("bnserve.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class TooLarge(Exception):
    pass


class BadEncoding(Exception):
    pass


class RequestContextMiddleware:
    def __init__(
        self,
        app,
        *,
        max_body: int,
        metrics: Metrics,
        known_model: Callable[[str], bool],
        shed: Callable[[str], ServiceError | None] = lambda path: None,
    ) -> None:
        self.app = app
        self.shed = shed
        self.max_body = max_body
        self.metrics = metrics
        self.known_model = known_model

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        supplied = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = supplied if _SAFE_ID.match(supplied) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                refusal = self.shed(scope["path"])
                if refusal is not None:  # refused before reading the body
                    await _error(
                        send_with_id, refusal.status_code, refusal.message, refusal.headers
                    )
                    return
                try:
                    body = await self._read_body(headers, receive)
                except TooLarge as exc:
                    await _error(send_with_id, 413, str(exc))
                    return
                except BadEncoding as exc:
                    await _error(send_with_id, 400, str(exc))
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            self._record(scope, status[0], elapsed)
            request_id.reset(token)

    async def _read_body(self, headers: dict, receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise TooLarge(self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise TooLarge(self._too_large(size))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        encoding = headers.get(b"content-encoding", b"identity").decode("latin-1").strip().lower()
        if encoding in ("gzip", "deflate"):
            body = self._decompress(body, encoding)
        elif encoding not in ("identity", ""):
            raise BadEncoding(
                f"Content-Encoding {encoding!r} is not supported; expected gzip, deflate or none"
            )
        return body

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        # Bounded output: a small compressed body must not expand past the limit in memory.
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            out = inflater.decompress(body, self.max_body + 1)
        except zlib.error as exc:
            raise BadEncoding(f"body is not valid {encoding} data ({exc})") from None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            raise TooLarge(self._too_large(len(out), decompressed=True))
        return out

    def _too_large(self, size: int, decompressed: bool = False) -> str:
        what = "decompressed body" if decompressed else "request body"
        return (
            f"{what} of {size} bytes or more exceeds the limit of {self.max_body} bytes "
            "(BNSERVE_MAX_REQUEST_BYTES); expected a smaller request"
        )

    def _record(self, scope, status: int, elapsed: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        name = scope.get("path_params", {}).get("model_name", "")
        model = name if name and self.known_model(name) else ("" if not name else "unknown")
        self.metrics.requests.labels(endpoint, model, str(status)).inc()
        self.metrics.latency.labels(endpoint, model).observe(elapsed)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "%s %s %d", scope["method"], scope["path"], status,
                extra={"status": status, "duration_ms": round(elapsed * 1000, 3),
                       "path": scope["path"], "method": scope["method"]},
            )  # fmt: skip


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later messages: disconnect

    return replay


async def _error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer and close: the request body was not (fully) read, so the connection ends."""
    payload = orjson.dumps({"error": message})
    extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
