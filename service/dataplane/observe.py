"""What every call records, whatever protocol carried it: requests in flight, the request
counter and latency histogram by endpoint/model/code, and one access-log line. REST's
middleware and the gRPC servicer both report through here, so a call counts the same way."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import PayloadTooLarge
from ..logs import log_access
from ..metrics import Metrics


class CallObserver:
    def __init__(self, metrics: Metrics, known_model: Callable[[str], bool]) -> None:
        self.in_flight = 0  # calls being handled; the gauge reads it when scraped
        metrics.in_flight.set_function(lambda: self.in_flight)
        self.requests = metrics.requests
        self.latency = metrics.latency
        self.too_large = metrics.rejected.labels("", "too_large")
        self.known_model = known_model

    def started(self) -> float:
        self.in_flight += 1
        return time.perf_counter()

    def refused_too_large(self) -> None:
        """A request over BNSERVE_MAX_REQUEST_BYTES, whichever protocol refused it."""
        self.too_large.inc()

    def finished(
        self, started: float, *, endpoint: str, model: str, code: int | str, method: str, path: str
    ) -> float:
        """Record one finished call (code: an HTTP status, or a gRPC status name); returns its
        duration in seconds."""
        elapsed = time.perf_counter() - started
        self.in_flight -= 1
        label = model if not model or self.known_model(model) else "unknown"
        self.requests.labels(endpoint, label, str(code)).inc()
        self.latency.labels(endpoint, label).observe(elapsed)
        log_access(method, path, code, elapsed)
        return elapsed


def too_large(size: int, limit: int, what: str = "request body") -> PayloadTooLarge:
    """The 413 / RESOURCE_EXHAUSTED for a request over BNSERVE_MAX_REQUEST_BYTES."""
    return PayloadTooLarge(
        f"{what} of {size} bytes or more exceeds the limit of {limit} bytes "
        "(BNSERVE_MAX_REQUEST_BYTES); expected a smaller request"
    )
