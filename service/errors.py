"""Errors a request can end in, each mapped to its HTTP status and the v2 error body
{"error": "..."} with a message naming what was wrong and what was expected."""

from __future__ import annotations


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, {"www-authenticate": "Bearer"})


class NotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


class Unavailable(ServiceError):
    status_code = 503

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message, {"retry-after": str(max(1, round(retry_after)))})


class GatewayTimeout(ServiceError):
    status_code = 504
