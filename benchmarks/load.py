"""Throughput with 16 concurrent clients on 127.0.0.1, side by side in one run:

  raw     in-process ONNX Runtime session.run at each batch size (no HTTP, no client)
  bnserve the service with dynamic batching, single-sample binary requests over REST
          (http.client), and the same server over gRPC (raw_input_contents), from bare HTTP/2
          clients (benchmarks.h2client, http.client's counterpart) and from grpcio channels
  KServe  the same ORT session in KServe's Python model server (kserve package, own venv)

on the ResNet-18-sized CNN at 224x224. Prints a table.

    python -m benchmarks.load [--clients 16] [--seconds 12] [--rounds 2] [--ways REGEX]
                              [--no-kserve]

Each round measures raw session.run at every batch size, then every way in turn (never call by
call). The verdict lines give the ratio of all rounds pooled and, per round, the way's rate over
that round's raw rate at the best batch size: their median and min-max, so a reader can see how
far one run's figure can be trusted. `--ways` keeps only the configurations whose name matches.
The batch column is the mean samples per session.run, from the server's own
`bnserve_batch_size` histogram (warm-ups included).

The load is closed-loop: each client keeps one request outstanding on its own keep-alive
connection; the client threads share the machine with the server, which raw session.run does
not have to, so the ratio to raw is conservative.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.loadgen import LoadResult, grpc_request, run_grpc_load, run_load
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body, json_body
from service.launcher import ROOT, ServiceProcess, free_port
from service.runtime import SessionFactory

KSERVE_VENV = ROOT / "artifacts" / "kserve-venv"
KSERVE_PIN = "kserve==0.21.0"


def raw_throughput(model: Path, size: int, batches: list[int], seconds: float) -> dict[int, float]:
    """Samples per second of back-to-back session.run calls at each batch size."""
    session = SessionFactory().create(model)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    rates = {}
    for batch in batches:
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        session.run(None, {name: x})
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            session.run(None, {name: x})
            runs += 1
        rates[batch] = runs * batch / (time.perf_counter() - started)
    return rates


def batches_run(url: str) -> tuple[float, float]:
    """(batches, samples) the server's `bnserve_batch_size` histogram has counted so far."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    totals = {"count": 0.0, "sum": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name == "bnserve_batch_size":
            for sample in family.samples:
                kind = sample.name.rsplit("_", 1)[1]
                if kind in totals:
                    totals[kind] += sample.value
    return totals["count"], totals["sum"]


def kserve_python() -> Path:
    """KServe in a venv of its own (its pins must not move bnserve's packages)."""
    python = KSERVE_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(KSERVE_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", KSERVE_PIN, "onnxruntime-gpu>=1.31,<1.32"],
            check=True,
        )
    return python


class KServeProcess:
    def __init__(self, model: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [str(kserve_python()), str(ROOT / "benchmarks" / "kserve_peer.py"),
                   "--model", str(model), "--port", str(self.port)]  # fmt: skip
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def __enter__(self) -> KServeProcess:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v2/models/resnet18/ready", timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.process.kill()
        raise TimeoutError("KServe peer did not become ready")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12, help="per way and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=8)
    # Long enough for the clients a batch just answered to get their next requests in: on 2
    # cores the event loop shares them with the runners, and reading 8 requests of 600 kB
    # takes it 5-8 ms. 2 ms formed batches of 4.6-5 samples on average, 10 ms of 7-8, for
    # 0-2 % more throughput and a lower p99 (README). 10 ms is 4 % of a one-thread run of 8.
    # Several values (2000,10000) give each batching way once per delay, side by side.
    parser.add_argument(
        "--queue-delay-us",
        type=lambda text: [int(value) for value in text.split(",")],
        default=[10000],
        help="max queue delay of the batching ways, µs; comma-separated for several",
    )
    parser.add_argument("--no-kserve", action="store_true")
    parser.add_argument("--ways", default="", help="regex: only the ways whose name matches")
    args = parser.parse_args(argv)

    path = export_benchmark_model(args.repository, args.size)
    x = np.random.default_rng(1).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    body, headers = binary_body(x, "images")
    json_request = json_body(x, "images")
    infer = "/v2/models/resnet18/infer"
    two_sessions = {"BNSERVE_INFERENCE_THREADS": "2", "BNSERVE_INTRA_OP_THREADS": "1"}
    configs = {"bnserve, no batching": {}, "bnserve, 2 x 1-thread sessions": two_sessions}
    for delay in args.queue_delay_us:
        batching = {
            "BNSERVE_MAX_BATCH_SIZE": str(args.max_batch_size),
            "BNSERVE_MAX_QUEUE_DELAY_US": str(delay),
        }
        named = f", {delay / 1000:g} ms delay" if len(args.queue_delay_us) > 1 else ""
        configs[f"bnserve, dynamic batching <= {args.max_batch_size}{named}"] = batching
        configs[f"bnserve, batching <= {args.max_batch_size}, 2 x 1-thr{named}"] = (
            batching | two_sessions
        )
    batches = [1, 2, 4, 8, 16]
    raw_rates: dict[int, list[float]] = {b: [] for b in batches}
    results: dict[str, LoadResult] = {}
    per_round: dict[str, list[float]] = {}  # each round's throughput, by way
    batched: dict[str, tuple[float, float]] = {}  # (batches, samples) each bnserve way ran
    with contextlib.ExitStack() as stack:
        # Every server is up for the whole run (idle ones cost no CPU) and the ways take
        # turns round by round, so drift on a noisy machine hits them all alike.
        targets = {}
        metrics_url: dict[str, str] = {}  # bnserve ways: the server whose batches they count

        def rest(url, content, request_headers):
            return lambda: run_load(url, infer, content, request_headers, clients=args.clients,
                                    seconds=args.seconds, warmup=1.0)  # fmt: skip

        for name, env in configs.items():
            server = stack.enter_context(
                ServiceProcess(args.repository, env={"BNSERVE_LOG_LEVEL": "warning", **env})
            )
            targets[name] = rest(server.url, body, headers)
            metrics_url[name] = server.url
            if "BNSERVE_MAX_BATCH_SIZE" in env:  # the same batching server, over gRPC
                for label, bare in (("bnserve gRPC,", True), ("bnserve gRPC grpcio,", False)):
                    metrics_url[name.replace("bnserve,", label)] = server.url
                    targets[name.replace("bnserve,", label)] = (
                        lambda address=server.grpc_address, bare=bare: run_grpc_load(
                            address, grpc_request(x, "images", "resnet18"),
                            clients=args.clients, seconds=args.seconds, warmup=1.0, bare=bare,
                        )
                    )  # fmt: skip
        if not args.no_kserve:
            peer = stack.enter_context(KServeProcess(path / "model.onnx"))
            version = KSERVE_PIN.split("==")[1]
            targets[f"KServe {version}, JSON requests"] = rest(peer.url, *json_request)
            targets[f"KServe {version}, binary requests"] = rest(peer.url, body, headers)
        targets = {name: m for name, m in targets.items() if re.search(args.ways, name)}
        for _ in range(args.rounds):
            for batch, rate in raw_throughput(
                path / "model.onnx", args.size, batches, args.seconds / 5
            ).items():
                raw_rates[batch].append(rate)
            for name, measure in targets.items():
                before = batches_run(metrics_url[name]) if name in metrics_url else None
                result = measure()
                if before is not None:  # warm-up included: the server cannot tell it apart
                    after = batches_run(metrics_url[name])
                    ran = batched.get(name, (0.0, 0.0))
                    batched[name] = (ran[0] + after[0] - before[0], ran[1] + after[1] - before[1])
                results[name] = results[name].merge(result) if name in results else result
                per_round.setdefault(name, []).append(result.throughput())
    raw = {b: sum(r) / len(r) for b, r in raw_rates.items()}
    best_batch = max(raw, key=raw.get)
    rows: list[tuple[str, float, LoadResult | None]] = [
        (f"raw session.run, batch {b}", rate, None) for b, rate in raw.items()
    ]
    rows += [(name, result.throughput(), result) for name, result in results.items()]
    bnserve = max(
        (r.throughput() for n, r in results.items() if n.startswith("bnserve")), default=0
    )
    kserve = max((r.throughput() for n, r in results.items() if n.startswith("KServe")), default=0)

    print(f"\n{args.clients} clients, single-sample requests, ResNet-18-sized CNN {args.size}x{args.size}, "
          f"{os.cpu_count()} cores, {args.rounds} rounds of {args.seconds:g} s per way")  # fmt: skip
    width = max(len(name) for name, _, _ in rows)
    print(
        f"{'':<{width}} | {'samples/s':>9} | {'vs raw best':>11} | {'p50 ms':>7} | "
        f"{'p99 ms':>7} | {'batch':>5} | codes"
    )
    print("-" * (width + 66))
    for name, rate, result in rows:
        latency = (
            f"{result.percentile(50):7.1f} | {result.percentile(99):7.1f}"
            if result
            else f"{'':7} | {'':7}"
        )
        codes = dict(result.codes) | dict(result.errors) if result else ""
        runs, samples = batched.get(name, (0.0, 0.0))
        mean_batch = f"{samples / runs:5.2f}" if runs else f"{'':5}"  # samples per session.run
        print(f"{name:<{width}} | {rate:9.2f} | {rate / raw[best_batch]:11.3f} | {latency} | "
              f"{mean_batch} | {codes}")  # fmt: skip
    width += 22  # the verdict's label and its best row's name
    print(f"\n{'ratio to raw at its best batch size (' + str(best_batch) + ')':<{width}} | pooled | "
          f"median of rounds | rounds min-max")  # fmt: skip
    print("-" * (width + 46))
    verdicts = [
        ("bnserve (best row)", "bnserve,"),
        ("bnserve gRPC (best row)", "bnserve gRPC,"),
        ("bnserve gRPC grpcio (best row)", "bnserve gRPC grpcio,"),
    ]
    for label, prefix in verdicts:
        ways = [n for n in results if n.startswith(prefix)]
        if not ways:
            continue
        best = max(ways, key=lambda n: results[n].throughput())
        rounds = [rate / raw_rates[best_batch][i] for i, rate in enumerate(per_round[best])]
        print(
            f"{label + ': ' + best.split(', ', 1)[1]:<{width}} | {results[best].throughput() / raw[best_batch]:6.3f} | "
            f"{statistics.median(rounds):16.3f} | {min(rounds):.3f}-{max(rounds):.3f}"
        )  # fmt: skip
    if kserve:
        print(f"bnserve (best row) / KServe (best row): {bnserve / kserve:.3f}")


if __name__ == "__main__":
    main()
