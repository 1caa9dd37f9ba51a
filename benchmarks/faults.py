"""Faults under load, with figures: a 60-second overload (peak RSS, rejections), a hot reload
under load (failed requests during the swap), and SIGTERM under load (accepted requests
dropped). All traffic goes to 127.0.0.1 and is bounded in time. Prints a table.

    python -m benchmarks.faults [--overload-seconds 60] [--clients 64]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

from benchmarks.loadgen import run_load
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body
from service.launcher import ROOT, ServiceProcess


class PeakRss:
    """Samples a process's resident memory every 100 ms in the background."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.start = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def overload(repo: Path, body, headers, clients: int, seconds: float, *, polite: bool) -> dict:
    env = {
        "BNSERVE_MAX_BATCH_SIZE": "8",
        "BNSERVE_MAX_QUEUE_SIZE": "16",
        "BNSERVE_LOG_LEVEL": "warning",
    }
    with ServiceProcess(repo, env=env) as server, PeakRss(server.process.pid) as rss:
        result = run_load(server.url, "/v2/models/resnet18/infer", body, headers,
                          clients=clients, seconds=seconds, honor_retry_after=polite)  # fmt: skip
        ready = server.status("/v2/health/ready")
    return {
        "result": result,
        "rss_start_mb": rss.start / 2**20,
        "rss_peak_mb": rss.peak / 2**20,
        "ready_after": ready,
    }


def hot_reload(repo: Path, body, headers, clients: int) -> dict:
    live = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(repo, live, ignore=shutil.ignore_patterns("2", "3"))
    outcome = {}
    with ServiceProcess(
        live, env={"BNSERVE_MAX_BATCH_SIZE": "8", "BNSERVE_LOG_LEVEL": "warning"}
    ) as server:

        def swap() -> None:
            time.sleep(3)
            shutil.copytree(live / "resnet18" / "1", live / "resnet18" / ".staging")
            card = (live / "resnet18" / ".staging" / "model.json").read_text()
            (live / "resnet18" / ".staging" / "model.json").write_text(
                card.replace('"version": 1', '"version": 2')
            )
            (live / "resnet18" / ".staging").rename(live / "resnet18" / "2")
            started = time.perf_counter()
            request = urllib.request.Request(
                f"{server.url}/v2/repository/models/resnet18/load", method="POST"
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                outcome["load_status"] = response.status
            outcome["load_seconds"] = time.perf_counter() - started

        swapper = threading.Thread(target=swap)
        swapper.start()
        result = run_load(server.url, "/v2/models/resnet18/infer", body, headers,
                          clients=clients, seconds=10, warmup=1)  # fmt: skip
        swapper.join()
    shutil.rmtree(live.parent, ignore_errors=True)
    return {"result": result, **outcome}


def drain(repo: Path, body, headers, clients: int) -> dict:
    env = {
        "BNSERVE_DRAIN_DELAY": "2",
        "BNSERVE_MAX_BATCH_SIZE": "8",
        "BNSERVE_LOG_LEVEL": "warning",
    }
    server = ServiceProcess(repo, env=env).wait_ready()
    readiness = {}

    def terminate() -> None:
        time.sleep(3)
        sent = time.perf_counter()
        server.process.send_signal(signal.SIGTERM)
        while server.status("/v2/health/ready") == 200:
            time.sleep(0.01)
        readiness["unready_after_ms"] = (time.perf_counter() - sent) * 1000
        server.process.wait(60)
        readiness["exit_seconds"] = time.perf_counter() - sent

    killer = threading.Thread(target=terminate)
    killer.start()
    result = run_load(server.url, "/v2/models/resnet18/infer", body, headers,
                      clients=clients, seconds=8, warmup=1)  # fmt: skip
    killer.join()
    server.stop()
    return {"result": result, **readiness}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--overload-seconds", type=float, default=60)
    args = parser.parse_args(argv)
    export_benchmark_model(args.repository, args.size)
    x = np.random.default_rng(2).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
    body, headers = binary_body(x, "images")

    storm = overload(
        args.repository, body, headers, args.clients, args.overload_seconds, polite=False
    )
    polite = overload(
        args.repository, body, headers, args.clients, args.overload_seconds / 2, polite=True
    )
    h = hot_reload(args.repository, body, headers, clients=8)
    d = drain(args.repository, body, headers, clients=8)

    print(f"\nFaults under load, ResNet-18-sized CNN {args.size}x{args.size}, 127.0.0.1")
    print(f"{'scenario':<42} | figures")
    print("-" * 110)
    for label, o, seconds in (
        ("overload, retry storm (no backoff)", storm, args.overload_seconds),
        ("overload, clients honor Retry-After", polite, args.overload_seconds / 2),
    ):
        r = o["result"]
        print(f"{f'{label}: {args.clients} clients, {seconds:g} s':<42} | "
              f"served {r.ok} ({r.throughput():.1f}/s), 503 {r.codes.get(503, 0)}, other codes "
              f"{ {k: v for k, v in r.codes.items() if k not in (200, 503)} }, client-side errors {dict(r.errors)}")  # fmt: skip
        print(f"{'  memory (RSS)':<42} | start {o['rss_start_mb']:.0f} MiB, peak {o['rss_peak_mb']:.0f} MiB; "
              f"ready afterwards: {o['ready_after'] == 200}")  # fmt: skip
    hr = h["result"]
    failed = sum(v for k, v in hr.codes.items() if k != 200) + sum(hr.errors.values())
    print(f"{'hot reload under load (8 clients)':<42} | {hr.ok} served, {failed} failed; load call "
          f"{h.get('load_status')} in {h.get('load_seconds', 0):.2f} s")  # fmt: skip
    dr = d["result"]
    dropped = sum(v for k, v in dr.codes.items() if k != 200) + sum(
        v for k, v in dr.errors.items() if k != "ConnectionRefusedError"
    )
    print(f"{'SIGTERM under load (8 clients)':<42} | {dr.ok} served, {dropped} accepted-then-dropped, "
          f"{dr.errors.get('ConnectionRefusedError', 0)} refused after close; unready after "
          f"{d.get('unready_after_ms', 0):.0f} ms, exit after {d.get('exit_seconds', 0):.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
