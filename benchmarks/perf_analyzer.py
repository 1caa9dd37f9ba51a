"""Triton's perf_analyzer against bnserve: the tool, fetched from PyPI, and one run of it.

perf_analyzer ships inside tritonclient 2.41.0's manylinux wheel (later releases moved it to a
separate package built for newer glibc). It links libb64 (Debian's libb64-0d, installed by
`make test` / `make system-deps`) and libcudart.so.12, which the nvidia-cuda-runtime-cu12 wheel
provides; both wheels are downloaded with pip into artifacts/perf_analyzer/ (gitignored) and
unpacked there once.

    python -m benchmarks.perf_analyzer [--repository artifacts/bench] [--model resnet18_bench]

prints perf_analyzer's figures for the model over HTTP and gRPC, batch 1 and 4, concurrency 1-4.
"""

from __future__ import annotations

import argparse
import ctypes.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "artifacts" / "perf_analyzer"
WHEELS = ("tritonclient==2.41.0", "nvidia-cuda-runtime-cu12==12.3.101")
BINARY = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
CUDART = "nvidia/cuda_runtime/lib/libcudart.so.12"


class ToolUnavailable(RuntimeError):
    """perf_analyzer cannot be had here; the message says why."""


@dataclass(frozen=True)
class Tool:
    binary: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.binary), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def tool(cache: Path = CACHE) -> Tool:
    """perf_analyzer, downloaded and unpacked on first use."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        raise ToolUnavailable("perf_analyzer's wheel is for linux x86_64 only")
    if ctypes.util.find_library("b64") is None:
        raise ToolUnavailable("libb64 is missing: apt-get install libb64-0d (make system-deps)")
    binary, cudart = cache / BINARY, cache / CUDART
    if not (binary.exists() and cudart.exists()):
        _fetch(cache)
    binary.chmod(0o755)
    library_path = os.pathsep.join(
        p for p in (str(cudart.parent), os.environ.get("LD_LIBRARY_PATH", "")) if p
    )
    return Tool(binary, dict(os.environ, LD_LIBRARY_PATH=library_path))


def _fetch(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--disable-pip-version-check", "--only-binary=:all:",
            "--platform", "manylinux1_x86_64", "--python-version", "3.11",
            "--dest", str(cache), *WHEELS,
        ],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if download.returncode != 0:
        raise ToolUnavailable(f"pip could not download {WHEELS}: {download.stderr.strip()[-300:]}")
    for wheel in cache.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for member in (BINARY, CUDART):
                if member in archive.namelist():
                    archive.extract(member, cache)


@dataclass(frozen=True)
class Measurement:
    protocol: str
    batch: int
    concurrency: int
    throughput: float  # inferences (samples) per second
    p50_us: float
    p99_us: float


def measure(
    tool_: Tool,
    model: str,
    url: str,
    *,
    protocol: str,
    batch: int,
    concurrency: str = "1:4",
    window_ms: int = 500,
) -> list[Measurement]:
    """One perf_analyzer run (concurrency range, short windows); raises with its output on
    any error."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".csv") as report:
        result = tool_.run(
            "-m", model, "-u", url, "-i", protocol, "-b", str(batch),
            # Its default random bytes hold NaN/Inf as FP32, which the service refuses (400).
            "--input-data", "zero",
            "--concurrency-range", concurrency, "--measurement-interval", str(window_ms),
            # A shared, noisy machine never looks stable to perf_analyzer's default 10 %: take
            # the third window whatever it shows (the figures are indicative there).
            "--max-trials", "5", "--stability-percentage", "1000", "-f", report.name,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(
                f"perf_analyzer -i {protocol} -b {batch} failed ({result.returncode}):\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )
        lines = Path(report.name).read_text().splitlines()
    # perf_analyzer writes its rows by throughput, not by concurrency
    rows = sorted(
        (_row(protocol, batch, line) for line in lines[1:] if line.strip()),
        key=lambda r: r.concurrency,
    )
    low, high = (int(v) for v in concurrency.split(":")[:2])
    if [r.concurrency for r in rows] != list(range(low, high + 1)):
        raise RuntimeError(
            f"perf_analyzer -i {protocol} -b {batch} measured concurrency "
            f"{[r.concurrency for r in rows]} of {low}..{high}:\n{result.stdout[-3000:]}"
        )
    return rows


def _row(protocol: str, batch: int, line: str) -> Measurement:
    cells = line.split(",")
    # perf_analyzer's CSV: Concurrency, Inferences/Second, ..., p50/p90/p95/p99 latency (us)
    return Measurement(
        protocol, batch, int(cells[0]), float(cells[1]), float(cells[-4]), float(cells[-1])
    )


def main(argv: list[str] | None = None) -> int:
    from benchmarks.resnet import export_benchmark_model
    from service.launcher import ServiceProcess

    parser = argparse.ArgumentParser(description="perf_analyzer against bnserve")
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--window-ms", type=int, default=2000)
    args = parser.parse_args(argv)
    export_benchmark_model(args.repository)
    model = "resnet18"
    tool_ = tool()
    env = {"BNSERVE_LOG_LEVEL": "warning", "BNSERVE_MAX_BATCH_SIZE": "8"}
    rows = []
    with ServiceProcess(args.repository, env=env) as server:
        for protocol, url in (("http", server.url.removeprefix("http://")),
                              ("grpc", server.grpc_address)):  # fmt: skip
            for batch in (1, 4):
                rows += measure(
                    tool_, model, url, protocol=protocol, batch=batch, window_ms=args.window_ms
                )
    print(f"perf_analyzer on {model} (dynamic batching, max batch 8)")
    print(f"{'protocol':<9}{'batch':>6}{'conc.':>6}{'infer/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(
            f"{r.protocol:<9}{r.batch:>6}{r.concurrency:>6}{r.throughput:>10.1f}"
            f"{r.p50_us / 1000:>9.2f}{r.p99_us / 1000:>9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
