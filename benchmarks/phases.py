"""Where one request's time goes, phase by phase, across the client and the served process: the
service runs in a child process with timing probes on the functions a request passes through,
and the client's own timestamps are on the same clock (time.perf_counter is CLOCK_MONOTONIC on
Linux, one clock for every process), so the phases add up to what the client measured.

    python -m benchmarks.phases [--model resnet18|digits] [--rounds 6] [--count N]

One client, one keep-alive connection, a pre-encoded body (binary tensors for resnet18, JSON for
digits), one request at a time. Blocks of raw in-process session.run and of served requests take
turns, never call by call, with blocks of the same requests to a plain service (no probes) for
the probes' own cost. Needs Linux (one monotonic clock across processes).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.overhead import digits_repository, poster
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body, json_body
from service.launcher import ROOT, ServiceProcess, free_port
from service.runtime import SessionFactory

# (module, class, method, event at entry, event at exit); the request's own events come from
# the middleware's wrapper (arrived, answering, finished).
PROBES = [
    ("service.middleware", "RequestContextMiddleware", "_read_body", None, "body read"),
    ("service.dataplane.inference", "InferenceService", "infer", "plane", "plane done"),
    ("service.dataplane.inference", "InferenceService", "validate", "validate", "validated"),
    ("service.batching", "BatchScheduler", "submit", None, "submitted"),
    ("service.batching", "BatchScheduler", "_timed_run", "run", "ran"),
]
# Phase = (label, from event, to event); "sent" and "got" are the client's.
PHASES = [
    ("client -> service (send, HTTP parse)", "sent", "arrived"),
    ("body read (size limit, encoding)", "arrived", "body read"),
    ("decode (model lookup, header, tensors)", "body read", "plane"),
    ("plane -> validate", "plane", "validate"),
    ("validate (signature, numpy, finiteness)", "validate", "validated"),
    ("admission, queue, hop to the run's thread", "validated", "run"),
    ("session.run", "run", "ran"),
    ("back on the event loop (hop, statistics)", "ran", "submitted"),
    ("outputs", "submitted", "plane done"),
    ("encode, response headers", "plane done", "answering"),
    ("service -> client (write, response read)", "answering", "got"),
]
# After the answer, overlapping the client's next request: uvicorn's bookkeeping after the
# write, metrics and the access log.
AFTER = ("after the answer: metrics, access log", "answering", "finished")


def _serve(argv: list[str]) -> int:
    """The service with probes (child process); events are written to $BNSERVE_PHASES_OUT."""
    import importlib

    from service import cli, middleware

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

    for module, owner, name, on_entry, on_exit in PROBES:
        cls = getattr(importlib.import_module(module), owner)
        setattr(cls, name, probe(getattr(cls, name), on_entry, on_exit))

    call = middleware.RequestContextMiddleware.__call__

    async def traced_call(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await call(self, scope, receive, send)
        current.clear()
        current["arrived"] = clock()

        async def traced_send(message):
            # The answer's bytes go out inside this call: its start is the last moment on the
            # request's path (uvicorn's bookkeeping after the write overlaps the client).
            if message["type"] == "http.response.body" and not message.get("more_body"):
                current["answering"] = clock()
            await send(message)

        await call(self, scope, receive, traced_send)
        current["finished"] = clock()
        requests.append(dict(current))

    middleware.RequestContextMiddleware.__call__ = traced_call
    code = cli.main(argv)
    Path(os.environ["BNSERVE_PHASES_OUT"]).write_text(json.dumps(requests))
    return code


class ProbedService:
    def __init__(self, repository: Path) -> None:
        self.port = free_port()
        self.out = Path(tempfile.mkstemp(suffix=".json")[1])
        env = dict(os.environ, BNSERVE_PHASES_OUT=str(self.out), PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.phases", "--serve", "--repository",
             str(repository), "--host", "127.0.0.1", "--port", str(self.port), "--grpc-port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/health/ready", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.process.kill()
                    raise RuntimeError("the probed service did not start") from None
                time.sleep(0.2)

    def events(self) -> list[dict[str, float]]:
        """Stops the service; the events of every POST it answered, in order."""
        self.process.terminate()
        self.process.wait(30)
        try:
            return json.loads(self.out.read_text() or "[]")
        finally:
            self.out.unlink(missing_ok=True)


@dataclass
class PhaseReport:
    """Seconds per request: each phase's, the client's total (the phases telescope from the
    client's send to its receipt, so they add up to it request by request), the same requests
    to a service without probes, and raw session.run."""

    model: str
    phases: dict[str, list[float]]
    after: list[float]
    total: list[float]
    unprobed: list[float]
    raw: list[float]

    def print(self) -> None:
        unit, scale = ("ms", 1e3) if self.model == "resnet18" else ("µs", 1e6)
        print(f"\n{self.model}, one client, {len(self.total)} requests, {os.cpu_count()} cores; "
              f"p50 and mean per phase, {unit}")  # fmt: skip
        print(f"{'phase':<44} | {'p50':>8} | {'mean':>8}")
        rows = [*self.phases.items(), None, ("client: request to response", self.total),
                (AFTER[0], self.after),
                ("the same, service without probes", self.unprobed),
                ("raw session.run in the client", self.raw)]  # fmt: skip
        for row in [None, *rows]:
            if row is None:
                print("-" * 66)
                continue
            label, values = row
            print(
                f"{label:<44} | {statistics.median(values) * scale:8.3f} | "
                f"{statistics.mean(values) * scale:8.3f}"
            )


def measure(model: str, repository: Path, rounds: int, count: int) -> PhaseReport:
    if model == "resnet18":
        session_path = export_benchmark_model(repository) / "model.onnx"
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        body = binary_body(x, "images")
    else:
        session_path = digits_repository(repository) / "digits" / "1" / "model.onnx"
        x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
        body = json_body(x, "images")
    session = SessionFactory().create(session_path)
    feed = {session.get_inputs()[0].name: x}
    plain = ServiceProcess(repository).wait_ready()
    service = ProbedService(repository)
    client: list[tuple[float, float]] = []
    raw: list[float] = []
    unprobed: list[float] = []
    try:
        path = f"/v2/models/{model}/infer"
        post, post_plain = poster(service.port, path, *body), poster(plain.port, path, *body)
        warm = 5  # requests not measured
        for _ in range(warm):
            post()
            post_plain()
            session.run(None, feed)
        for _ in range(rounds):
            for _ in range(count):
                started = time.perf_counter()
                session.run(None, feed)
                raw.append(time.perf_counter() - started)
            for _ in range(count):
                sent = time.perf_counter()
                post()
                client.append((sent, time.perf_counter()))
            for _ in range(count):
                started = time.perf_counter()
                post_plain()
                unprobed.append(time.perf_counter() - started)
    finally:
        plain.stop()
        events = service.events()
    events = events[warm:]
    if len(events) != len(client):
        raise RuntimeError(f"{len(events)} requests traced, {len(client)} sent")
    phases: dict[str, list[float]] = {label: [] for label, _, _ in PHASES}
    for (sent, got), served in zip(client, events, strict=True):
        times = {**served, "sent": sent, "got": got}
        for label, start, end in PHASES:
            phases[label].append(times[end] - times[start])
    total = [got - sent for sent, got in client]
    after = [served[AFTER[2]] - served[AFTER[1]] for served in events]
    return PhaseReport(model, phases, after, total, unprobed, raw)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        sys.exit(_serve(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["resnet18", "digits"], default="resnet18")
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "overhead")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--count", type=int, help="requests per block (25 resnet18, 400 digits)")
    args = parser.parse_args(argv)
    count = args.count or (25 if args.model == "resnet18" else 400)
    measure(args.model, args.repository, args.rounds, count).print()


if __name__ == "__main__":
    main()
