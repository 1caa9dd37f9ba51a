"""Triton's perf_analyzer, an external oracle of the protocol, drives a real server over HTTP
and gRPC, batch 1 and 4, concurrency 1-4: every request must succeed, the server's own
statistics must agree, and perf_analyzer must accept the model configuration (max_batch_size)."""

from __future__ import annotations

import httpx
import pytest

from benchmarks.perf_analyzer import ToolUnavailable, measure, tool
from service.launcher import ServiceProcess


@pytest.fixture(scope="module")
def perf_analyzer():
    try:
        return tool()
    except ToolUnavailable as exc:
        pytest.skip(f"perf_analyzer unavailable: {exc}")


@pytest.fixture(scope="module")
def server(demo_repository):
    env = {"BNSERVE_MAX_BATCH_SIZE": "8", "BNSERVE_LOG_LEVEL": "warning"}
    with ServiceProcess(demo_repository, env=env) as process:
        yield process


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 4])
def test_perf_analyzer_runs_without_errors(perf_analyzer, server, protocol, batch):
    url = server.grpc_address if protocol == "grpc" else server.url.removeprefix("http://")
    # measure() raises with perf_analyzer's output on any error or a missing concurrency level
    rows = measure(perf_analyzer, "digits", url, protocol=protocol, batch=batch, window_ms=400)
    assert [r.concurrency for r in rows] == [1, 2, 3, 4]
    assert all(r.throughput > 0 for r in rows)
    stats = httpx.get(f"{server.url}/v2/models/digits/stats").json()["model_stats"][0]
    assert stats["inference_stats"]["fail"]["count"] == 0
    assert stats["inference_stats"]["success"]["count"] > 0
