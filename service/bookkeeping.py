"""Per-request bookkeeping (metrics, Triton statistics) done once the answer is on its way.

A small model's request spends more time recording itself than running: histograms, counters
and statistics are a quarter of the Python it executes. None of it changes the answer, so the
data plane hands it to `later` instead of doing it in line: it runs in one event-loop callback
after the current step, that is after the REST response was written (the write is in the same
step), while the client reads its answer. Nothing is lost or reordered, and every reader
(`/metrics`, the statistics calls) calls `flush()` first, so no reader sees a request answered
but not yet counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger("bnserve.bookkeeping")


class Bookkeeping:
    """Deferred calls, run in order on the event loop: `later(fn, *args)`, then `flush()` (by
    itself soon after, or by a reader that needs the figures now)."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Callable[..., object], tuple]] = deque()
        self._scheduled: asyncio.AbstractEventLoop | None = None  # the loop a flush waits on

    def __call__(self, function: Callable[..., object], *args: object) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a plain call, as in a test): this call, now;
            self._run(function, args)  # the loop's own calls stay the loop's to run
            return
        self._pending.append((function, args))
        if self._scheduled is not loop:  # none yet, or one a closed loop will never run
            self._scheduled = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = None
        pending = self._pending
        while pending:
            function, args = pending.popleft()
            self._run(function, args)

    @staticmethod
    def _run(function: Callable[..., object], args: tuple) -> None:
        try:
            function(*args)
        except Exception:  # a broken figure must not break the next one or the loop
            log.exception("bookkeeping call %r failed", function)

    def __len__(self) -> int:
        return len(self._pending)
