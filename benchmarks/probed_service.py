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

from service import cli, middleware

# (module, class, method, event at entry, event at exit); the request's own events come from
# the middleware's wrapper (arrived, answering, finished).
PROBES = [
    ("service.middleware", "RequestContextMiddleware", "_read_body", None, "body read"),
    ("service.dataplane.inference", "InferenceService", "infer", "plane", "plane done"),
    ("service.dataplane.inference", "InferenceService", "validate", "validate", "validated"),
    ("service.dataplane.inference", "InferenceService", "run", None, "run returned"),
    ("service.batching", "BatchScheduler", "_timed_run", "run", "ran"),
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


_call = middleware.RequestContextMiddleware.__call__


async def traced_call(self, scope, receive, send):
    if scope["type"] != "http" or scope["method"] != "POST":
        return await _call(self, scope, receive, send)
    current.clear()
    current["arrived"] = clock()

    async def traced_send(message):
        # The answer's bytes go out inside this call: its start is the last moment on the
        # request's path (uvicorn's bookkeeping after the write overlaps the client).
        if message["type"] == "http.response.body" and not message.get("more_body"):
            current["answering"] = clock()
        await send(message)

    await _call(self, scope, receive, traced_send)
    current["finished"] = clock()
    requests.append(dict(current))


def main(argv: list[str]) -> int:
    for module, owner, name, on_entry, on_exit in PROBES:
        cls = getattr(importlib.import_module(module), owner)
        setattr(cls, name, probe(getattr(cls, name), on_entry, on_exit))
    middleware.RequestContextMiddleware.__call__ = traced_call
    code = cli.main(argv)
    Path(os.environ["BNSERVE_PHASES_OUT"]).write_text(json.dumps(requests))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
