"""What live drift monitoring costs, side by side in one run, on the ResNet-18-sized CNN:

  throughput  16 clients, single-sample binary requests, dynamic batching <= 8
  latency     1 client, batch 1, no batching (p50, p99)
  memory      RSS of the 16-client servers, from after their warm-up to after the last round

each with monitoring at the default settings (sample rate, cap and CPU budget; --rate changes
the rate) and off (rate 0), each way on a server of its own. The ways take turns in blocks,
round by round, in reverse order every other round (on off | off on | ...), never call by call;
every round gives one on/off ratio per figure, and the verdict is on the median of the rounds'
ratios, with their spread. Prints the rounds and a table.

    python -m benchmarks.drift_cost [--seconds 80] [--rounds 10] [--rate <default>] [--stress]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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
WARMUP_SECONDS = 5.0  # per server, at its own load, before RSS is first read


def metric(url: str, series: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
    return 0.0


def rss(server: ServiceProcess) -> int:
    return psutil.Process(server.process.pid).memory_info().rss


def spread(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--seconds",
        type=float,
        default=80,
        help="16-client load per way, all rounds (batch-1: half)",
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--rate", type=float, default=Settings().drift_sample_rate)
    parser.add_argument(
        "--stress", action="store_true", help="also a way sampling every request (default cap)"
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
    blocks: dict[tuple[str, str], list[LoadResult]] = {
        (way, kind): [] for way in monitoring for kind in ("batching", "batch-1")
    }
    with contextlib.ExitStack() as stack:
        servers = {}
        for way, env in monitoring.items():
            for kind, extra in (("batching", batching), ("batch-1", {})):
                servers[way, kind] = stack.enter_context(
                    ServiceProcess(
                        args.repository, env={"BNSERVE_LOG_LEVEL": "warning", **env, **extra}
                    )
                )
        loaded = {way: rss(servers[way, "batching"]) for way in monitoring}
        for (_, kind), server in servers.items():  # warm-up: the load sizes ORT's arenas
            clients = args.clients if kind == "batching" else 1
            run_load(server.url, infer, body, headers, clients=clients,
                     seconds=WARMUP_SECONDS, warmup=1)  # fmt: skip
        rss_before = {way: rss(servers[way, "batching"]) for way in monitoring}
        peak = dict(rss_before)
        started = time.monotonic()
        for round_ in range(args.rounds):
            # Every other round in reverse: no way always follows the same one (a server that
            # just served 16 clients leaves ORT threads winding down into the next block).
            order = list(monitoring) if round_ % 2 == 0 else list(reversed(monitoring))
            for kind, clients, seconds in (
                ("batching", args.clients, per_round),
                ("batch-1", 1, per_round / 2),
            ):
                for way in order:
                    url = servers[way, kind].url
                    result = run_load(url, infer, body, headers, clients=clients,
                                      seconds=seconds, warmup=0.5)  # fmt: skip
                    blocks[way, kind].append(result)
            for way in monitoring:
                peak[way] = max(peak[way], rss(servers[way, "batching"]))
        elapsed = time.monotonic() - started
        rss_after = {way: rss(servers[way, "batching"]) for way in monitoring}
        labels = '{model="resnet18",version="1"}'
        counters = {
            way: [
                metric(servers[way, "batching"].url, f"bnserve_drift_{name}_total{labels}")
                for name in (
                    "sampled_requests",
                    "skipped_requests",
                    "dropped_requests",
                    "monitor_seconds",
                )
            ]
            for way in monitoring
            if way != "off"
        }

    settings = Settings()
    print(f"\nlive drift monitoring at sample rate {args.rate:g} (cap "
          f"{settings.drift_max_samples_per_s:g}/s, CPU budget {settings.drift_max_cpu:g} of a "
          f"core) vs off, ResNet-18-sized CNN {args.size}x{args.size}, {os.cpu_count()} cores, "
          f"{args.rounds} rounds of {per_round:g} s (16 clients) + {per_round / 2:g} s (batch 1) "
          "per way")  # fmt: skip
    ways = [w for w in monitoring if w != "off"]
    tput_ratios = {w: [] for w in ways}
    p50_ratios = {w: [] for w in ways}
    print(f"\n{'round':>5} | " + " | ".join(
        f"{w + ' samples/s':>18} | {w + ' b1 p50 ms':>18}" for w in monitoring
    ) + " | " + " | ".join(f"tput {w}/off | p50 {w}/off" for w in ways))  # fmt: skip
    for i in range(args.rounds):
        tput = {w: blocks[w, "batching"][i].throughput() for w in monitoring}
        p50 = {w: blocks[w, "batch-1"][i].percentile(50) for w in monitoring}
        cells = [f"{tput[w]:18.2f} | {p50[w]:18.2f}" for w in monitoring]
        ratios = []
        for w in ways:
            tput_ratios[w].append(tput[w] / max(tput["off"], 1e-9))
            p50_ratios[w].append(p50[w] / max(p50["off"], 1e-9))
            ratios.append(f"{tput_ratios[w][-1]:>11.3f} | {p50_ratios[w][-1]:>11.3f}")
        print(f"{i + 1:>5} | " + " | ".join(cells) + " | " + " | ".join(ratios))

    pooled: dict[tuple[str, str], LoadResult] = {}
    print(f"\n{'all rounds pooled':<44} | {'samples/s':>9} | {'p50 ms':>7} | {'p99 ms':>7} | codes")
    print("-" * 84)
    for kind, name in (("batching", "16 clients, batching <= 8"), ("batch-1", "batch 1")):
        for way in monitoring:
            result = blocks[way, kind][0]
            for block in blocks[way, kind][1:]:
                result = result.merge(block)
            pooled[way, kind] = result
            codes = dict(result.codes) | dict(result.errors)
            print(f"{name + ', monitoring ' + way:<44} | {result.throughput():9.2f} | "
                  f"{result.percentile(50):7.2f} | {result.percentile(99):7.2f} | {codes}")  # fmt: skip

    print(f"\n{'figure (verdict: median of the rounds)':<40} | {'median':>7} | "
          f"{'rounds min-max':>14} | {'pooled':>7} | {'target':>7} | met")  # fmt: skip
    print("-" * 92)
    for w in ways:
        t, p = statistics.median(tput_ratios[w]), statistics.median(p50_ratios[w])
        t_all = pooled[w, "batching"].throughput() / pooled["off", "batching"].throughput()
        p_all = pooled[w, "batch-1"].percentile(50) / pooled["off", "batch-1"].percentile(50)
        print(f"{'throughput ' + w + ' / off':<40} | {t:7.3f} | {spread(tput_ratios[w]):>14} | "
              f"{t_all:7.3f} | {'>= 0.97':>7} | {'yes' if t >= 0.97 else 'NO'}")  # fmt: skip
        print(f"{'batch-1 p50 ' + w + ' / off':<40} | {p:7.3f} | {spread(p50_ratios[w]):>14} | "
              f"{p_all:7.3f} | {'<= 1.02':>7} | {'yes' if p <= 1.02 else 'NO'}")  # fmt: skip
    print(f"\n{'RSS growth from after warm-up, MiB':<40} | {'end':>7} | {'peak (rounds)':>14} | "
          f"{'':>7} | {'target':>7} | met")  # fmt: skip
    print("-" * 92)
    for way in monitoring:
        grown = (rss_after[way] - rss_before[way]) / MiB
        top = (peak[way] - rss_before[way]) / MiB
        met = ("yes" if grown < 20 else "NO") if way != "off" else ""
        name = f"{elapsed:.0f} s of rounds, monitoring {way}"
        print(f"{name:<40} | {grown:+7.1f} | {top:+14.1f} | {'':>7} | "
              f"{'< 20' if way != 'off' else '':>7} | {met}")  # fmt: skip
    print()
    for way in monitoring:
        print(f"16-client server, monitoring {way}: RSS {loaded[way] / MiB:.0f} MiB loaded, "
              f"{rss_before[way] / MiB:.0f} MiB after warm-up, {rss_after[way] / MiB:.0f} at "
              "the end")  # fmt: skip
    for way, (sampled, skipped, dropped, spent) in counters.items():
        print(f"16-client server, monitoring {way}: {sampled:.0f} requests sampled, "
              f"{skipped:.0f} skipped (CPU budget), {dropped:.0f} dropped (queue full), "
              f"{spent:.2f} s of monitor thread CPU ({100 * spent / elapsed:.2f} % of a core)")  # fmt: skip


if __name__ == "__main__":
    main()
