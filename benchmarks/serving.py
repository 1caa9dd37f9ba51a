"""Latency of one request, side by side in one run: in-process ONNX Runtime session.run vs the
service over HTTP with binary tensors vs gRPC (raw_input_contents) vs HTTP with JSON tensors (and
the stat-drift endpoint), on a ResNet-18-sized CNN at 224x224, batch 1 and 8. Prints a table.

    python -m benchmarks.serving [--repository artifacts/bench] [--rounds 3]

The service runs as a real `python -m service` process on 127.0.0.1. The client keeps a
connection open per way and sends bodies encoded in advance, so the figures are the service's cost
(transport, parsing, validation, run, encoding), not the client library's: it is the standard
library's http.client (httpx alone adds 0.5-3 ms to a 600 kB request here); over gRPC its
counterpart, benchmarks.h2client, writes the serialized ModelInferRequest's HTTP/2 frames to the
socket and reads the answer on the calling thread (checked bit for bit against grpcio's). The
"gRPC grpcio" row sends the same bytes through a grpcio channel, as tritonclient does: grpcio's
client hands each answer through its own polling and completion-queue threads, ~0.25 ms per
call on 2 cores, which is the client library's cost, not the service's. Blocks of the ways
take turns round by round, every other round in reverse order, each block after one untimed
call, so drift on a noisy machine hits them alike.

Reference servers, with the same clients and bodies (--no-references skips them): the floors,
the bare ASGI app (benchmarks.bare_asgi, uvicorn) and the bare gRPC server
(benchmarks.bare_grpc, grpcio's asyncio server with bnserve's options), each receiving the
request whole and answering a fixed body; and the least-Python server over each
(benchmarks.least_python: parse, finiteness, the same session.run on the event loop, encode;
nothing else). Their gRPC / REST ratios are what the two protocol stacks alone make of it,
without bnserve; the last table sets them beside bnserve's, round by round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import orjson

from benchmarks.h2client import GrpcConnection
from benchmarks.loadgen import GRPC_INFER, grpc_caller, grpc_request
from benchmarks.reference import BareServer, grpc_listening, poster
from benchmarks.resnet import export_benchmark_model
from service.launcher import ServiceProcess
from service.runtime import SessionFactory

ROOT = Path(__file__).resolve().parent.parent


REST_FLOOR = "REST floor"
GRPC_FLOOR = "gRPC floor"
LEAST_REST = "least Py HTTP"
LEAST_GRPC = "least Py gRPC"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def binary_body(x: np.ndarray, name: str, output: str = "output") -> tuple[bytes, dict]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": name, "shape": list(x.shape), "datatype": "FP32",
                 "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": output, "parameters": {"binary_data": True}}],
        }
    )  # fmt: skip
    return header + x.tobytes(), {"inference-header-content-length": str(len(header))}


def json_body(x: np.ndarray, name: str) -> tuple[bytes, dict]:
    body = {
        "inputs": [
            {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1)}
        ]
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), {
        "content-type": "application/json"
    }


def time_calls(call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def time_block(call, count: int) -> list[float]:
    """`time_calls` after one untimed call, which reopens a connection the server closed while
    other ways took their turn."""
    try:
        call()
    except Exception:
        call()
    return time_calls(call, count)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "artifacts" / "bench")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=30, help="per block at batch 1")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--no-drift", action="store_true", help="skip the stat-drift column")
    parser.add_argument("--no-references", action="store_true", help="skip the bare servers")
    args = parser.parse_args(argv)

    path = export_benchmark_model(args.repository, args.size)
    session = SessionFactory().create(path / "model.onnx")
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    batches = [int(b) for b in args.batches.split(",")]
    ways = ["raw session.run", "HTTP binary", "gRPC", "gRPC grpcio", "HTTP JSON"] + (
        [] if args.no_drift else ["stat-drift"]
    )
    with contextlib.ExitStack() as opened:  # each process and connection closes, whatever fails
        references = {} if args.no_references else start_references(opened, path / "model.onnx")
        ways += list(references)
        results = {(b, w): [] for b in batches for w in ways}
        rounds = {(b, w): [] for b in batches for w in ways}  # each round's p50
        server = opened.enter_context(
            ServiceProcess(args.repository, env={"BNSERVE_LOG_LEVEL": "warning"})
        )
        port = urlsplit(server.url).port
        channel, grpc_call = grpc_caller(server.grpc_address)
        opened.callback(channel.close)
        bare = GrpcConnection("127.0.0.1", server.grpc_port)
        opened.callback(bare.close)
        to_reference = {}
        for way in (GRPC_FLOOR, LEAST_GRPC):
            if way in references:
                to_reference[way] = GrpcConnection("127.0.0.1", references[way].port)
                opened.callback(to_reference[way].close)
        infer_url = "/v2/models/resnet18/infer"
        drift_url = "/v2/models/resnet18/stat-drift"
        for batch in batches:
            x = rng.standard_normal((batch, 3, args.size, args.size)).astype(np.float32)
            binary, as_json = binary_body(x, input_name), json_body(x, input_name)
            message = grpc_request(x, input_name, "resnet18")
            # (posters reconnect: uvicorn closes a connection idle for 5 s)
            calls = {
                "raw session.run": lambda x=x: session.run(None, {input_name: x}),
                "HTTP binary": poster(port, infer_url, *binary),
                "gRPC": lambda m=message: bare.unary(GRPC_INFER, m, timeout=120),
                "gRPC grpcio": lambda m=message: grpc_call(m, timeout=120),
                "HTTP JSON": poster(port, infer_url, *as_json),
                "stat-drift": poster(port, drift_url, *binary),
            }
            for way, reference in references.items():
                if way in to_reference:
                    calls[way] = lambda c=to_reference[way], m=message: c.unary(
                        GRPC_INFER, m, timeout=120
                    )
                else:
                    calls[way] = poster(reference.port, infer_url, *binary)
            if calls["gRPC"]() != calls["gRPC grpcio"]():
                raise RuntimeError("the bare gRPC client's answer differs from grpcio's")
            for way in ways:  # warm-up: first runs allocate and tune
                for _ in range(3):
                    calls[way]()
            count = max(5, args.iterations // batch)
            for round_ in range(args.rounds):
                # every other round in reverse: no way always follows the same one
                for way in ways if round_ % 2 == 0 else ways[::-1]:
                    samples = time_block(calls[way], count)
                    results[(batch, way)].extend(samples)
                    rounds[(batch, way)].append(statistics.median(samples))

    print(
        f"\nResNet-18-sized CNN, {args.size}x{args.size}, ONNX Runtime CPU, {os.cpu_count()} cores"
    )
    print(
        f"{'batch':>5} | {'way':<16} | {'p50 ms':>8} | {'p99 ms':>8} | {'p50 / raw':>9} | {'p50 / binary':>12} | n"
    )
    print("-" * 80)
    for batch in batches:
        raw = statistics.median(results[(batch, "raw session.run")])
        binary = statistics.median(results[(batch, "HTTP binary")])
        for way in ways:
            samples = results[(batch, way)]
            p50 = statistics.median(samples)
            print(
                f"{batch:>5} | {way:<16} | {percentile(samples, 50):8.2f} | "
                f"{percentile(samples, 99):8.2f} | {p50 / raw:9.3f} | {p50 / binary:12.3f} | {len(samples)}"
            )

    if references:
        print_protocol_ratios(batches, rounds)


def start_references(opened: contextlib.ExitStack, model: Path) -> dict[str, BareServer]:
    """The floors and the least-Python servers, over HTTP and gRPC, each stopped with `opened`."""
    least = ("benchmarks.least_python", "--model", str(model))
    return {
        REST_FLOOR: opened.enter_context(BareServer()),
        GRPC_FLOOR: opened.enter_context(BareServer("benchmarks.bare_grpc", probe=grpc_listening)),
        LEAST_REST: opened.enter_context(BareServer(*least)),
        LEAST_GRPC: opened.enter_context(BareServer(*least, "--grpc", probe=grpc_listening)),
    }


def print_protocol_ratios(batches: list[int], rounds: dict) -> None:
    """gRPC / REST for bnserve and for the reference servers, round by round: the median of
    the rounds' ratios and their min-max (how far one round can be trusted)."""

    def cell(batch: int, way: str, reference: str) -> str:
        ratios = [
            a / b for a, b in zip(rounds[(batch, way)], rounds[(batch, reference)], strict=True)
        ]
        return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"

    print("\ngRPC / REST p50, each round's ratio: median of rounds (min-max)")
    columns = {
        "bnserve gRPC / HTTP binary": ("gRPC", "HTTP binary"),
        "bnserve grpcio / HTTP binary": ("gRPC grpcio", "HTTP binary"),
        "least Python gRPC / HTTP": (LEAST_GRPC, LEAST_REST),
        "floors gRPC / REST": (GRPC_FLOOR, REST_FLOOR),
    }
    print(f"{'batch':>5} | " + " | ".join(f"{c:<28}" for c in columns) + " | floor gap ms")
    print("-" * 143)
    for batch in batches:
        cells = [cell(batch, way, reference) for way, reference in columns.values()]
        gap = statistics.median(
            a - b
            for a, b in zip(rounds[(batch, GRPC_FLOOR)], rounds[(batch, REST_FLOOR)], strict=True)
        )
        print(f"{batch:>5} | " + " | ".join(f"{c:<28}" for c in cells) + f" | {gap * 1000:12.3f}")


if __name__ == "__main__":
    main()
