"""`python -m service` with timing probes, for benchmarks.phases: takes the service's arguments
and, as it exits, writes one dict of event times (time.perf_counter) per POST it answered, in
order, as JSON to the file $BNSERVE_PHASES_OUT.

Each probe is a wrapper that stores perf_counter() at a function's entry and/or exit into the
current request's dict; requests come one at a time, so one dict is current.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

from service import cli
from service.protocol.http1 import Http1Protocol

# (module, class, method, event at entry, event at exit), on the path an infer request takes
# through the HTTP protocol (service.protocol.http1); the request's own events (arrived,
# answering, finished) come from the wrappers below.
PROBES = [
    ("service.protocol.http1", "Http1Protocol", "on_message_complete", "body read", None),
    ("service.dataplane.inference", "InferenceService", "infer_now", "plane", None),
    ("service.dataplane.inference", "InferenceService", "validate", "validate", "validated"),
    ("service.batching", "BatchScheduler", "_timed_run", "run", "ran"),
    ("service.dataplane.inference", "InferenceService", "_respond", "run returned", "plane done"),
    ("service.protocol.http1", "Http1Protocol", "_response", None, "answering"),
]

clock = time.perf_counter
requests: list[dict[str, float]] = []
current: dict[str, float] = {}


def probe(function, on_entry: str | None, on_exit: str | None):
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args, **kwargs):
            if on_entry:
                current[on_entry] = clock()
            result = await function(*args, **kwargs)
            if on_exit:
                current[on_exit] = clock()
            return result

        return timed_async

    @functools.wraps(function)
    def timed(*args, **kwargs):
        if on_entry:
            current[on_entry] = clock()
        result = function(*args, **kwargs)
        if on_exit:
            current[on_exit] = clock()
        return result

    return timed


_headers_complete = Http1Protocol.on_headers_complete
_answer = Http1Protocol._answer


def traced_headers_complete(self) -> None:
    if self.parser.get_method() == b"POST":
        current.clear()
        current["arrived"] = clock()
    _headers_complete(self)


def traced_answer(self, call, answer) -> None:
    # The answer's bytes go out inside this call, right after "answering"; what follows
    # (metrics, access log, uvicorn's keep-alive timer) overlaps the client.
    _answer(self, call, answer)
    current["finished"] = clock()
    requests.append(dict(current))


def main(argv: list[str]) -> int:
    for module, owner, name, on_entry, on_exit in PROBES:
        cls = getattr(importlib.import_module(module), owner)
        setattr(cls, name, probe(getattr(cls, name), on_entry, on_exit))
    Http1Protocol.on_headers_complete = traced_headers_complete
    Http1Protocol._answer = traced_answer
    code = cli.main(argv)
    Path(os.environ["BNSERVE_PHASES_OUT"]).write_text(json.dumps(requests))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
