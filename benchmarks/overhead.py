"""Per-request overhead of bnserve against the stack's floor, side by side in one run:

- floor: a bare uvicorn + httptools + uvloop ASGI app that reads the body and answers a fixed
  v2 JSON body (benchmarks/bare_asgi.py);
- digits demo model, one sample: bnserve with JSON and with binary tensors, and with JSON through
  the ASGI app (BNSERVE_HTTP_FAST_INFER=false: what the HTTP protocol's own infer path saves);
  and a server doing only that JSON request's own work (benchmarks/least_python.py: parse,
  refuse NaN/Inf, run, encode; no other check, metric or log; through uvicorn's ASGI cycle,
  which bnserve's HTTP path skips), which shows how much of the ratio to the floor is the
  model's own work in Python and how much is bnserve's;
- ResNet-18-sized CNN, batch 1: in-process session.run vs bnserve with binary tensors through
  tritonclient.http (and through http.client with a pre-encoded body) vs JSON; the least-Python
  server with the same binary body (its run on the event loop: no thread hop); and the bare
  app receiving that 600 kB body: raw + that round trip is what any server on this stack
  could answer in, with no work of its own (printed as the transport floor).

    python -m benchmarks.overhead [--rounds 7] [--repository artifacts/overhead]

One client on 127.0.0.1, one keep-alive connection per server, bodies encoded in advance. Ways
are timed in blocks that take turns round by round, never interleaved call by call: an ONNX
Runtime pool that just ran steals the cores the next call needs, so interleaving a raw session
with the server call by call makes the server look much slower than it is. Prints p50/p99 and
the ratios the targets are about: pooled over all rounds, and per round (each round's p50s side
by side), whose median is the verdict and whose min-max shows how far one round can be trusted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from benchmarks.reference import BareServer, poster
from benchmarks.resnet import export_benchmark_model
from benchmarks.serving import binary_body, json_body, percentile, time_block
from service.launcher import ROOT, ServiceProcess
from service.runtime import SessionFactory


@dataclass(frozen=True)
class Ratio:
    label: str
    way: str
    reference: str
    target: float


RATIOS = [
    Ratio("least Python JSON / floor", "least Python, digits JSON", "floor (bare ASGI)", 1.6),
    Ratio("digits JSON / floor", "digits JSON", "floor (bare ASGI)", 1.6),
    Ratio("digits binary / floor", "digits binary", "floor (bare ASGI)", 1.6),
    Ratio("digits JSON, ASGI path / floor", "digits JSON, ASGI path", "floor (bare ASGI)", 1.6),
    Ratio("least Python ResNet binary / raw", "least Python, ResNet binary", "ResNet raw", 1.05),
    Ratio("ResNet binary (tritonclient) / raw", "ResNet binary tritonclient", "ResNet raw", 1.05),
    Ratio("ResNet binary (http.client) / raw", "ResNet binary http.client", "ResNet raw", 1.05),
    Ratio("ResNet JSON / raw", "ResNet JSON", "ResNet raw", 1.25),
]


def digits_model(repository: Path) -> Path:
    return repository / "digits" / "1" / "model.onnx"


def digits_repository(repository: Path) -> Path:
    """The demo model (`python -m export demo`), made once."""
    if not (repository / "digits").exists():
        subprocess.run(
            [sys.executable, "-m", "export", "demo", "--repository", str(repository)],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return repository


def tritonclient_infer(port: int, model: str, x: np.ndarray, name: str) -> Callable[[], None]:
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{port}", concurrency=1)
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    output = triton.InferRequestedOutput("output", binary_data=True)
    return lambda: client.infer(model, [tensor], outputs=[output]).as_numpy("output")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "overhead")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--small", type=int, default=400, help="calls per block, small ways")
    parser.add_argument("--large", type=int, default=25, help="calls per block, ResNet ways")
    parser.add_argument("--no-resnet", action="store_true", help="floor and digits only")
    args = parser.parse_args(argv)

    repository = digits_repository(args.repository)
    if not args.no_resnet:
        resnet = export_benchmark_model(repository)
    sample = next((repository / "digits" / "1" / "samples").glob("*.json"))
    tensor = orjson.loads(sample.read_bytes())["inputs"][0]
    digit = np.array(tensor["data"][:64], np.float32).reshape(1, 1, 8, 8)

    with contextlib.ExitStack() as started:  # each process stops, whatever fails after it
        least_model = ("benchmarks.least_python", "--model")
        bare = started.enter_context(BareServer())
        least = started.enter_context(BareServer(*least_model, str(digits_model(repository))))
        if not args.no_resnet:
            least_resnet = started.enter_context(
                BareServer(*least_model, str(resnet / "model.onnx"))
            )
        server = started.enter_context(ServiceProcess(repository))
        asgi = started.enter_context(
            ServiceProcess(repository, env={"BNSERVE_HTTP_FAST_INFER": "false"})
        )
        digits_path = "/v2/models/digits/infer"
        calls: dict[str, Callable[[], None]] = {
            "floor (bare ASGI)": poster(bare.port, digits_path, *json_body(digit, "images")),
            "least Python, digits JSON": poster(
                least.port, digits_path, *json_body(digit, "images")
            ),
            "digits JSON": poster(server.port, digits_path, *json_body(digit, "images")),
            "digits binary": poster(
                server.port, digits_path, *binary_body(digit, "images", "logits")
            ),
            "digits JSON, ASGI path": poster(asgi.port, digits_path, *json_body(digit, "images")),
        }
        counts = dict.fromkeys(calls, args.small)
        if not args.no_resnet:
            session = SessionFactory().create(resnet / "model.onnx")
            name = session.get_inputs()[0].name
            x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
            path = "/v2/models/resnet18/infer"
            calls |= {
                "floor (bare ASGI), 600 kB": poster(bare.port, path, *binary_body(x, name)),
                "ResNet raw": lambda: session.run(None, {name: x}),
                "least Python, ResNet binary": poster(
                    least_resnet.port, path, *binary_body(x, name)
                ),
                "ResNet binary tritonclient": tritonclient_infer(server.port, "resnet18", x, name),
                "ResNet binary http.client": poster(server.port, path, *binary_body(x, name)),
                "ResNet JSON": poster(server.port, path, *json_body(x, name)),
            }
            counts |= {way: args.large for way in calls if "ResNet" in way}
            counts["floor (bare ASGI), 600 kB"] = args.small
        for call in calls.values():  # warm-up: first runs allocate, tune and fill caches
            for _ in range(5):
                call()
        rounds: dict[str, list[list[float]]] = {way: [] for way in calls}
        for _ in range(args.rounds):
            for way, call in calls.items():
                rounds[way].append(time_block(call, counts[way]))

    results = {way: [t for block in blocks for t in block] for way, blocks in rounds.items()}
    print(f"\nPer-request overhead, one client, keep-alive, {os.cpu_count()} cores")
    print("(blocks take turns, never interleaved call by call)")
    print(f"{'way':<28} | {'p50 ms':>8} | {'p99 ms':>8} | {'n':>5}")
    print("-" * 58)
    for way, samples in results.items():
        print(
            f"{way:<28} | {percentile(samples, 50):8.3f} | {percentile(samples, 99):8.3f} | "
            f"{len(samples):>5}"
        )
    print(f"\n{'ratio of p50s':<36} | pooled | median of rounds | rounds min-max | target | met")
    print("-" * 98)
    for ratio in RATIOS:
        if ratio.way not in results:
            continue
        pooled = statistics.median(results[ratio.way]) / statistics.median(results[ratio.reference])
        per_round = [
            statistics.median(way) / statistics.median(reference)
            for way, reference in zip(rounds[ratio.way], rounds[ratio.reference], strict=True)
        ]
        verdict = statistics.median(per_round)
        met = "yes" if verdict <= ratio.target else "no"
        print(
            f"{ratio.label:<36} | {pooled:6.3f} | {verdict:16.3f} | "
            f"{min(per_round):6.3f}-{max(per_round):6.3f} | {ratio.target:5.2f}x | {met}"
        )
    if "ResNet raw" in results:
        raw = statistics.median(results["ResNet raw"])
        transport = statistics.median(results["floor (bare ASGI), 600 kB"])
        print(
            f"\ntransport floor for the ResNet request: (raw + bare ASGI 600 kB round trip) / raw"
            f" = {(raw + transport) / raw:.3f} (no server on this stack can do better)"
        )


if __name__ == "__main__":
    main()
