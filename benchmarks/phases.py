"""Where one request's time goes, phase by phase, across the client and the served process: the
service runs in a child process with timing probes on the functions a request passes through
(benchmarks/probed_service.py), and the client's own timestamps are on the same clock (time.perf_counter is CLOCK_MONOTONIC on
Linux, one clock for every process), so the phases add up to what the client measured.

    python -m benchmarks.phases [--model resnet18|digits] [--rounds 6] [--count N]

One client, one keep-alive connection, a pre-encoded body (binary tensors for resnet18, JSON for
digits), one request at a time. Blocks of raw in-process session.run and of served requests take
turns, never call by call, with blocks of the same requests to a plain service (no probes) for
the probes' own cost. Needs Linux (one monotonic clock across processes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.overhead import digits_repository
from benchmarks.reference import poster
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body, json_body, time_calls
from service.launcher import ROOT, ServiceProcess
from service.runtime import SessionFactory

# Phase = (label, from event, to event); "sent" and "got" are the client's.
PHASES = [
    ("client -> service (send, HTTP parse)", "sent", "arrived"),
    ("body read (chunks joined)", "arrived", "body read"),
    ("decode (request id, model lookup, tensors)", "body read", "plane"),
    ("plane -> validate", "plane", "validate"),
    ("validate (signature, numpy, finiteness)", "validate", "validated"),
    ("admission, queue, hop to the run's thread", "validated", "run"),
    ("session.run", "run", "ran"),
    ("back on the event loop (hop)", "ran", "run returned"),
    ("outputs", "run returned", "plane done"),
    ("encode, response headers", "plane done", "answering"),
    ("service -> client (write, response read)", "answering", "got"),
]
# After the answer, overlapping the client's next request: uvicorn's bookkeeping after the
# write, the request counter and latency, and the access log (the run's and the request's
# other metrics and statistics follow in the next loop step, service.bookkeeping).
AFTER = ("after the answer: metrics, access log", "answering", "finished")


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
    out = Path(tempfile.mkstemp(suffix=".json")[1])
    probed = ServiceProcess(
        repository, "--grpc-port", "0",
        module="benchmarks.probed_service", env={"BNSERVE_PHASES_OUT": str(out)},
    )  # fmt: skip
    client: list[tuple[float, float]] = []
    raw: list[float] = []
    unprobed: list[float] = []
    warm = 5  # requests not measured
    try:
        with ServiceProcess(repository) as plain, probed as service:
            path = f"/v2/models/{model}/infer"
            post, post_plain = poster(service.port, path, *body), poster(plain.port, path, *body)
            for _ in range(warm):
                post()
                post_plain()
                session.run(None, feed)
            for _ in range(rounds):
                raw += time_calls(lambda: session.run(None, feed), count)
                for _ in range(count):  # both ends: the phases start and end on them
                    sent = time.perf_counter()
                    post()
                    client.append((sent, time.perf_counter()))
                unprobed += time_calls(post_plain, count)
        # Stopped: the probed service wrote its events as it exited.
        events = json.loads(out.read_text() or "[]")[warm:]
    finally:
        out.unlink(missing_ok=True)
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
