"""What live drift monitoring costs, side by side in one run, on the ResNet-18-sized CNN:

  throughput  16 clients, single-sample binary requests, dynamic batching <= 8
  latency     1 client, batch 1, no batching (p50, p99)
  memory      RSS of the monitored server before and after the run

each with monitoring at the default sample rate (Settings().drift_sample_rate) and off (0).
The ways take turns round by round so a noisy machine hits both alike. Prints a table.

    python -m benchmarks.drift_cost [--seconds 60] [--rounds 2] [--rate <default>]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from benchmarks.loadgen import LoadResult, run_load
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body
from service.config import Settings
from service.launcher import ROOT, ServiceProcess

MiB = 1024 * 1024


def metric(url: str, series: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def rss(server: ServiceProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60, help="load per way (all rounds)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=float, default=Settings().drift_sample_rate)
    parser.add_argument(
        "--stress", action="store_true", help="also every request sampled (under the default cap)"
    )
    args = parser.parse_args(argv)

    export_benchmark_model(args.repository, args.size)
    x = np.random.default_rng(1).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    body, headers = binary_body(x, "images")
    infer = "/v2/models/resnet18/infer"
    batching = {"BNSERVE_MAX_BATCH_SIZE": "8", "BNSERVE_MAX_QUEUE_DELAY_US": "2000"}
    monitoring = {"on": {"BNSERVE_DRIFT_SAMPLE_RATE": str(args.rate)},
                  "off": {"BNSERVE_DRIFT_SAMPLE_RATE": "0"}}  # fmt: skip
    if args.stress:
        monitoring["rate 1"] = {"BNSERVE_DRIFT_SAMPLE_RATE": "1"}
    per_round = args.seconds / args.rounds
    throughput: dict[str, LoadResult] = {}
    latency: dict[str, LoadResult] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for way, env in monitoring.items():
            for kind, extra in (("batching", batching), ("batch-1", {})):
                servers[way, kind] = stack.enter_context(
                    ServiceProcess(
                        args.repository, env={"BNSERVE_LOG_LEVEL": "warning", **env, **extra}
                    )
                )
        for (_, kind), server in servers.items():  # warm up: the load sizes ORT's arenas
            clients = args.clients if kind == "batching" else 1
            run_load(server.url, infer, body, headers, clients=clients, seconds=3, warmup=1)
        rss_before = {way: rss(servers[way, "batching"]) for way in monitoring}
        started = time.monotonic()
        for round_ in range(args.rounds):
            # Every other round in reverse: no way always follows the same one (a server that
            # just served 16 clients leaves ORT threads spinning into the next way's start).
            order = list(monitoring) if round_ % 2 == 0 else list(reversed(monitoring))
            for way in order:
                url = servers[way, "batching"].url
                result = run_load(url, infer, body, headers, clients=args.clients,
                                  seconds=per_round, warmup=0.5)  # fmt: skip
                throughput[way] = throughput[way].merge(result) if way in throughput else result
            for way in order:
                url = servers[way, "batch-1"].url
                result = run_load(url, infer, body, headers, clients=1,
                                  seconds=per_round / 2, warmup=0.5)  # fmt: skip
                latency[way] = latency[way].merge(result) if way in latency else result
        elapsed = time.monotonic() - started
        growth = {
            way: (rss(servers[way, "batching"]) - rss_before[way]) / MiB for way in monitoring
        }
        labels = '{model="resnet18",version="1"}'
        counters = {
            way: [
                metric(servers[way, "batching"].url, f"bnserve_drift_{name}_total{labels}")
                for name in ("sampled_requests", "dropped_requests", "monitor_seconds")
            ]
            for way in monitoring
            if way != "off"
        }

    print(f"\nlive drift monitoring at sample rate {args.rate:g} vs off, ResNet-18-sized CNN "
          f"{args.size}x{args.size}, {os.cpu_count()} cores, {args.rounds} rounds, "
          f"{args.seconds:g} s of load per way")  # fmt: skip
    print(f"{'':<44} | {'samples/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | codes")
    print("-" * 84)
    for kind, results in (("16 clients, batching <= 8", throughput), ("batch 1", latency)):
        for way, result in results.items():
            name = f"{kind}, monitoring {way}"
            codes = dict(result.codes) | dict(result.errors)
            print(f"{name:<44} | {result.throughput():9.2f} | {result.percentile(50):7.2f} | "
                  f"{result.percentile(99):7.2f} | {codes}")  # fmt: skip
    ratio = throughput["on"].throughput() / max(throughput["off"].throughput(), 1e-9)
    p50 = latency["on"].percentile(50) / max(latency["off"].percentile(50), 1e-9)
    if args.stress:
        stressed = throughput["rate 1"].throughput() / max(throughput["off"].throughput(), 1e-9)
        print(f"\nthroughput, every request sampled (cap {Settings().drift_max_samples_per_s:g}/s) "
              f"/ off: {stressed:.3f}")  # fmt: skip
    print(f"\nthroughput on / off: {ratio:.3f} (target >= 0.97)")
    print(f"batch-1 p50 on / off: {p50:.3f} (target <= 1.02)")
    for way, grown in growth.items():
        target = " (target < 20)" if way == "on" else ""
        print(f"RSS growth over {elapsed:.0f} s, 16-client server, monitoring {way}: "
              f"{grown:+.1f} MiB{target}")  # fmt: skip
    for way, (sampled, dropped, spent) in counters.items():
        print(f"16-client server, monitoring {way}: {sampled:.0f} requests sampled, "
              f"{dropped:.0f} dropped, {spent:.2f} s of monitor thread CPU")  # fmt: skip


if __name__ == "__main__":
    main()
