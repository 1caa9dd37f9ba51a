"""Bearer tokens for the admin (repository) and debug (stat-drift) endpoints."""

from __future__ import annotations

import hmac

from pydantic import SecretStr

from .errors import Unauthorized


def check_bearer(authorization: str | None, token: SecretStr | None, what: str, env: str) -> None:
    """Pass when no token is configured or the header carries it (constant-time compare)."""
    if token is None:
        return
    scheme, _, supplied = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    # compare_digest takes the same time wherever the strings differ.
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), expected):
        raise Unauthorized(
            f"{what} needs a bearer token ({env} is set); expected header "
            "'Authorization: Bearer <token>'"
        )
