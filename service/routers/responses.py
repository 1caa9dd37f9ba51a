"""Documented error responses, declared by each router for its routes (OpenAPI): every error
has the v2 body {"error": "..."}."""

from __future__ import annotations

import copy

DESCRIPTIONS = {
    400: "the request does not fit the API or the model",
    401: "missing or wrong bearer token (when a token is configured)",
    404: "unknown model, version or endpoint",
    413: "body over BNSERVE_MAX_REQUEST_BYTES",
    503: "not ready or overloaded (Retry-After)",
    504: "past BNSERVE_REQUEST_TIMEOUT",
}


# Spelled out rather than `"model": ErrorResponse`, which FastAPI would list under the route's
# own media type (text/html for the stat-drift page); app.py adds the component.
ERROR_BODY = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def errors(*codes: int) -> dict[int | str, dict]:
    return {
        code: {"description": DESCRIPTIONS[code], "content": copy.deepcopy(ERROR_BODY)}
        for code in codes
    }


# What the middleware can answer to any request with a body, before a route runs.
BODY_ERRORS = (400, 413)
