"""A minimal gRPC client: unary calls over one HTTP/2 connection on a plain blocking socket.

It is to gRPC what http.client is to HTTP in benchmarks.serving: the request's frames are
written straight to the socket and the answer is read back on the calling thread, so the time
measured is the server's (transport, parsing, run, encoding), not a client library's (grpcio's
channel hands every answer through its own polling and completion-queue threads). Only what a
benchmark needs: no TLS, no compression, no HPACK decoding, so trailers are not read: a call
that answers no message (an error status) or is reset raises CallFailed, and the benchmark
checks the answer against grpcio's, bit for bit.
"""

from __future__ import annotations

import socket
import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK, PADDED = 0x1, 0x4, 0x1, 0x8
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 0x4, 0x5
MAX_WINDOW = 2**31 - 1
RECEIVE_REFILL = 2**30
_HEAD = struct.Struct(">I")


class CallFailed(RuntimeError):
    pass


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HEAD.pack(len(payload))[1:] + bytes((kind, flags)) + _HEAD.pack(stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    return b"\x00" + _string(name) + _string(value)


def _string(data: bytes) -> bytes:
    length, out = len(data), bytearray()
    if length < 127:
        out.append(length)
    else:
        out.append(127)
        length -= 127
        while length >= 128:
            out.append(length % 128 + 128)
            length //= 128
        out.append(length)
    return bytes(out) + data


class GrpcConnection:
    """One HTTP/2 connection to a gRPC server, calls one at a time."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.authority = f"{host}:{port}".encode()
        self.next_stream = 1
        self.send_window = 65535  # the connection's, for our DATA
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.stream_windows: dict[int, int] = {}
        self._framed: tuple[bytes | None, memoryview] = (None, memoryview(b""))
        self.buffer = bytearray()
        self.received = 0  # DATA bytes since our last connection WINDOW_UPDATE
        settings = struct.pack(">HIHI", INITIAL_WINDOW_SIZE, MAX_WINDOW, 0x2, 0)  # no push
        self.sock.sendall(
            PREFACE
            + frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(MAX_WINDOW - 65535))
        )

    def close(self) -> None:
        self.sock.close()

    def request_headers(self, path: str, timeout: float | None = None) -> bytes:
        """A unary call's HEADERS block (HPACK literals)."""
        return b"".join(
            _literal(name, value)
            for name, value in (
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", self.authority),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                *(((b"grpc-timeout", f"{int(timeout)}S".encode()),) if timeout else ()),
            )
        )

    def unary(self, path: str, message: bytes, timeout: float | None = None) -> bytes:
        """Send one serialized request message; the serialized response message."""
        stream = self.next_stream
        self.next_stream += 2
        headers = self.request_headers(path, timeout)
        if message is not self._framed[0]:  # a message sent again is framed once
            self._framed = (message, memoryview(b"\x00" + _HEAD.pack(len(message)) + message))
        body = self._framed[1]
        total, sent = len(body), 0
        self.stream_windows[stream] = self.peer_initial_window
        parts: list = [frame(HEADERS, END_HEADERS, stream, headers)]
        while True:
            while sent < total:  # as much as the flow-control windows let through
                size = min(self.send_window, self.stream_windows[stream], self.peer_max_frame)
                size = min(size, total - sent)
                if size <= 0:
                    break
                flags = END_STREAM if sent + size == total else 0
                parts.append(_HEAD.pack(size)[1:] + bytes((DATA, flags)) + _HEAD.pack(stream))
                parts.append(body[sent : sent + size])
                sent += size
                self.send_window -= size
                self.stream_windows[stream] -= size
            if parts:
                self._send_all(parts)
                parts = []
            if sent == total:
                break
            self._read_frame(stream, None)  # until a WINDOW_UPDATE opens room
        return self.response(stream)

    def _send_all(self, parts: list) -> None:
        views = [memoryview(p) for p in parts]
        while views:
            count = self.sock.sendmsg(views[:1024])
            while count:
                if count >= len(views[0]):
                    count -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][count:]
                    count = 0

    def response(self, stream: int) -> bytes:
        """Read frames until `stream` ends; its response message."""
        data = bytearray()
        done = False
        while not done:
            done = self._read_frame(stream, data)
        self.stream_windows.pop(stream, None)  # a stream started by hand has none
        if len(data) < 5:
            raise CallFailed(f"stream {stream}: no response message (an error status)")
        (length,) = _HEAD.unpack_from(data, 1)
        return bytes(data[5 : 5 + length])

    def _recv_exactly(self, size: int) -> memoryview:
        while len(self.buffer) < size:
            chunk = self.sock.recv(max(65536, size - len(self.buffer)))
            if not chunk:
                raise CallFailed("connection closed by the server")
            self.buffer += chunk
        out = memoryview(bytes(self.buffer[:size]))
        del self.buffer[:size]
        return out

    def _read_frame(self, stream: int, data: bytearray | None) -> bool:
        """Read and handle one frame; True when it ends `stream`."""
        head = self._recv_exactly(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        sid = _HEAD.unpack_from(head, 5)[0] & MAX_WINDOW
        payload = self._recv_exactly(length) if length else memoryview(b"")
        if kind == SETTINGS and not flags & ACK:
            for offset in range(0, length, 6):
                key, value = struct.unpack_from(">HI", payload, offset)
                if key == INITIAL_WINDOW_SIZE:
                    delta = value - self.peer_initial_window
                    self.peer_initial_window = value
                    for open_stream in self.stream_windows:
                        self.stream_windows[open_stream] += delta
                elif key == MAX_FRAME_SIZE:
                    self.peer_max_frame = value
            self.sock.sendall(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.sock.sendall(frame(PING, ACK, 0, bytes(payload)))
        elif kind == WINDOW_UPDATE:
            increment = _HEAD.unpack_from(payload)[0] & MAX_WINDOW
            if sid == 0:
                self.send_window += increment
            elif sid in self.stream_windows:
                self.stream_windows[sid] += increment
        elif kind == GOAWAY:  # streams up to its last stream id still end normally
            if stream > _HEAD.unpack_from(payload)[0] & MAX_WINDOW:
                raise CallFailed("the server sent GOAWAY before this call")
        elif sid == stream:
            if kind == RST_STREAM:
                raise CallFailed(f"stream {stream} reset by the server")
            if kind == DATA and data is not None:
                body = payload
                if flags & PADDED:
                    body = payload[1 : length - payload[0]]
                data += body
                self.received += length
                if self.received > RECEIVE_REFILL:  # keep our connection window open
                    self.sock.sendall(frame(WINDOW_UPDATE, 0, 0, _HEAD.pack(self.received)))
                    self.received = 0
            if kind in (DATA, HEADERS) and flags & END_STREAM:
                return True
        return False
