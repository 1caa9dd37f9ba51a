"""One pure-ASGI middleware for what HTTP needs around every request: a request id, reading the
body within the data plane's size limit (413, checked before and while reading, decompressed
size included), refusing an inference request the data plane would refuse anyway before its
body is read, and reporting the call to the data plane's observer (metrics, access log). Pure
ASGI keeps the per-request cost to a few microseconds.

POST .../infer goes from here straight to the REST infer endpoint (`infer`, a
routers.infer.InferRoute) instead of through FastAPI's routing: same checks, same answers."""

from __future__ import annotations

import re
import zlib
from collections.abc import Awaitable, Callable

import orjson

from .dataplane.observe import CallObserver, too_large
from .errors import ServiceError
from .logs import new_request_id, request_id

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
INFERENCE_PATH = re.compile(
    r"^/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/(?P<action>infer|stat-drift)$"
)
# name, version, body, Inference-Header-Content-Length, send
InferEndpoint = Callable[[str, str | None, bytes, str | None, Callable], Awaitable[None]]


def declared_size(digits: bytes) -> int:
    """A Content-Length's value (ASCII digits), at most 10**18: an absurdly long one (with or
    without leading zeros) must not make int() raise or build a huge number."""
    digits = digits.lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else 10**18


def request_id_for(supplied: bytes) -> str:
    """The client's X-Request-ID when it is a safe token, else a new id."""
    text = supplied.decode("latin-1")
    return text if _SAFE_ID.match(text) else new_request_id()


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
        observer: CallObserver,
        refusal: Callable[[str, str | None], ServiceError | None] = lambda name, version: None,
        infer: InferEndpoint | None = None,
        infer_templates: tuple[str, str] = ("", ""),
    ) -> None:
        self.app = app
        self.infer = infer
        self.infer_templates = infer_templates  # endpoint labels: without, with a version
        self.refusal = refusal
        self.max_body = max_body
        self.observer = observer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        rid = request_id_for(headers.get(b"x-request-id", b""))
        token = request_id.set(rid)
        started = self.observer.started()
        status = [500]
        endpoint = None  # set when this middleware routes the request itself

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                match = INFERENCE_PATH.match(scope["path"])
                refusal = self.refusal(match["model"], match["version"]) if match else None
                if refusal is not None:  # refused before reading the body
                    await _error(
                        send_with_id, refusal.status_code, refusal.message, refusal.headers
                    )
                    return
                try:
                    body = await self._read_body(headers, receive)
                except TooLarge as exc:
                    self.observer.refused_too_large()
                    await _error(send_with_id, 413, str(exc))
                    return
                except BadEncoding as exc:
                    await _error(send_with_id, 400, str(exc))
                    return
                routed = match and match["action"] == "infer" and scope["method"] == "POST"
                if routed and self.infer is not None:
                    endpoint = self.infer_templates[match["version"] is not None]
                    header_length = headers.get(b"inference-header-content-length")
                    await self.infer(
                        match["model"],
                        match["version"],
                        body,
                        None if header_length is None else header_length.decode("latin-1"),
                        send_with_id,
                    )
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            if endpoint is not None:
                model = match["model"]
            else:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                model = scope.get("path_params", {}).get("model_name", "")
            self.observer.finished(
                started,
                endpoint=endpoint,
                model=model,
                code=status[0],
                method=scope["method"],
                path=scope["path"],
            )
            request_id.reset(token)

    async def _read_body(self, headers: dict, receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit():
            size = declared_size(declared)
            if size > self.max_body:
                raise TooLarge(self._too_large(size))
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
        return too_large(size, self.max_body, what).message


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
