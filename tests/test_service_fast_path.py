"""The lean hot path answers exactly as the framework path did.

- POST .../infer is served by a pure-ASGI endpoint ahead of FastAPI (routers.infer.InferRoute);
  the same app with infer through FastAPI's routes is the oracle: same status, body, headers
  and metric labels for good requests and a sample of bad ones.
- Small models run on the event loop (inline_run_us) and, batching off, skip the queue: the
  outputs stay bitwise equal to runs on the model's thread, and each sample's output does not
  depend on the rest of its batch.
"""

from __future__ import annotations

import gzip
import time

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings

INFER = "/v2/models/digits/infer"


def started(app) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    deadline = time.monotonic() + 60
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "the demo repository did not load"
        time.sleep(0.05)
    return client


@pytest.fixture(scope="module")
def clients(demo_repository):
    settings = Settings(repository=demo_repository, max_request_bytes=64 * 1024)
    fast = started(create_app(settings))
    routed = started(create_app(settings, fast_infer=False))
    yield fast, routed
    fast.__exit__(None, None, None)
    routed.__exit__(None, None, None)


def tensor(shape=(1, 1, 8, 8), datatype="FP32", data=None, **extra) -> dict:
    count = int(np.prod(shape))
    data = data if data is not None else [0.25] * count
    return {"name": "images", "shape": list(shape), "datatype": datatype, "data": data, **extra}


def binary(array: np.ndarray, **header) -> tuple[bytes, dict[str, str]]:
    raw = array.astype(np.float32).tobytes()
    head = {"inputs": [{"name": "images", "shape": list(array.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": len(raw)}}], **header}  # fmt: skip
    json_part = orjson.dumps(head)
    return json_part + raw, {"inference-header-content-length": str(len(json_part))}


GOOD, GOOD_HEADERS = binary(np.full((2, 1, 8, 8), 0.5), parameters={"binary_data_output": True})

NAN_BODY = orjson.dumps({"inputs": [tensor(data=[0.0] * 64)]}).replace(b"0.0", b"NaN")

# (path, body bytes, extra headers): good requests and a sample of client mistakes.
CASES = [
    (INFER, orjson.dumps({"inputs": [tensor()], "id": "a"}), {}),
    ("/v2/models/digits/versions/1/infer", orjson.dumps({"inputs": [tensor()]}), {}),
    (INFER, GOOD, GOOD_HEADERS),
    (INFER, gzip.compress(orjson.dumps({"inputs": [tensor()]})), {"content-encoding": "gzip"}),
    ("/v2/models/nope/infer", orjson.dumps({"inputs": [tensor()]}), {}),
    ("/v2/models/digits/versions/9/infer", orjson.dumps({"inputs": [tensor()]}), {}),
    (INFER, b"{not json", {}),
    (INFER, b"[1, 2]", {}),
    (INFER, orjson.dumps({"inputs": "x"}), {}),
    (INFER, orjson.dumps({"inputs": [tensor(shape=(1, 8, 8))]}), {}),
    (INFER, orjson.dumps({"inputs": [tensor(datatype="INT64", data=[1] * 64)]}), {}),
    (INFER, orjson.dumps({"inputs": [tensor(data=[0.1] * 63)]}), {}),
    (INFER, NAN_BODY, {}),
    (INFER, orjson.dumps({"inputs": [tensor(name="other")]}), {}),
    (INFER, orjson.dumps({"inputs": [tensor()], "outputs": [{"name": "nope"}]}), {}),
    (INFER, GOOD, {"inference-header-content-length": "x"}),
    (INFER, GOOD, {"inference-header-content-length": str(len(GOOD) + 5)}),
    (INFER, GOOD[:-4], GOOD_HEADERS),
    (INFER, orjson.dumps({"inputs": [tensor()]}), {"content-encoding": "br"}),
    (INFER, b"x" * (65 * 1024), {}),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_infer_route_answers_as_the_fastapi_route(clients, case):
    path, body, headers = CASES[case]
    fast, routed = clients
    rid = {"x-request-id": f"case-{case}"}
    a = fast.post(path, content=body, headers={**headers, **rid})
    b = routed.post(path, content=body, headers={**headers, **rid})
    assert (a.status_code, a.content) == (b.status_code, b.content)
    assert a.status_code != 500, a.text
    for header in ("content-type", "inference-header-content-length", "retry-after"):
        assert a.headers.get(header) == b.headers.get(header), header
    assert a.headers["x-request-id"] == f"case-{case}"
    if a.status_code >= 400:
        assert set(a.json()) == {"error"}


def test_metric_labels_are_the_route_templates(clients):
    fast, routed = clients
    for client in (fast, routed):
        client.post(INFER, json={"inputs": [tensor()]})
        client.post("/v2/models/digits/versions/1/infer", json={"inputs": [tensor()]})
    metrics = [c.get("/metrics").text for c in clients]
    for text in metrics:
        for template in ("/v2/models/{model_name}/infer",
                         "/v2/models/{model_name}/versions/{model_version}/infer"):  # fmt: skip
            line = f'endpoint="{template}",model="digits"'
            assert line in text.replace(", ", ","), template


def test_wrong_method_still_answers_405(clients):
    fast, _ = clients
    response = fast.put(INFER, json={"inputs": [tensor()]})
    assert response.status_code == 405
    assert "method not allowed" in response.json()["error"]


def run_outputs(client: TestClient, batch: np.ndarray) -> np.ndarray:
    body, headers = binary(batch, parameters={"binary_data_output": True})
    response = client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    size = int(response.headers["inference-header-content-length"])
    header = orjson.loads(response.content[:size])
    shape = header["outputs"][0]["shape"]
    return np.frombuffer(response.content[size:], np.float32).reshape(shape)


def test_inline_runs_are_bitwise_equal_and_batch_independent(demo_repository, digits_samples):
    batch = np.concatenate(list(digits_samples.values()))[:16]
    assert len(batch) >= 4
    inline = started(create_app(Settings(repository=demo_repository, inline_run_us=10**9)))
    threaded = started(create_app(Settings(repository=demo_repository, inline_run_us=0)))
    try:
        # The first run measures the model; inline runs start after it.
        run_outputs(inline, batch[:1])
        scheduler = inline.app.state.services.registry.get("digits", None).scheduler
        assert scheduler.inline(len(batch))
        assert not threaded.app.state.services.registry.get("digits", None).scheduler.inline(1)
        on_loop = run_outputs(inline, batch)
        on_thread = run_outputs(threaded, batch)
        assert on_loop.tobytes() == on_thread.tobytes()
        for i in range(len(batch)):
            alone = run_outputs(inline, batch[i : i + 1])
            assert alone.tobytes() == on_loop[i : i + 1].tobytes(), f"sample {i}"
        stats = inline.get("/v2/models/digits/stats").json()["model_stats"][0]
        assert stats["execution_count"] == stats["inference_stats"]["success"]["count"]
        assert stats["inference_count"] == 1 + 2 * len(batch)
    finally:
        inline.__exit__(None, None, None)
        threaded.__exit__(None, None, None)


def test_inline_decision_ignores_runs_slowed_by_waiting_for_the_gil():
    """A run on the model's thread is timed until that thread holds the GIL again, so a busy
    event loop inflates it; the decision takes the least of recent runs, so one cold first run
    and GIL-delayed thread runs do not keep a 40 µs model off the loop for good."""
    from service.batching import RUN_WINDOW, BatchingConfig, BatchScheduler
    from service.metrics import Metrics

    scheduler = BatchScheduler(
        "m", run=None, executor=None, config=BatchingConfig(inline_run_us=100), metrics=Metrics()
    )
    assert not scheduler.inline(1)  # never measured: the first run goes to the thread
    scheduler._measured(5e-3, 1)  # cold first run: allocation, kernel selection
    assert not scheduler.inline(1)
    for seconds in (400e-6, 40e-6, 900e-6, 350e-6):  # thread runs, some waiting for the GIL
        scheduler._measured(seconds, 1)
    assert scheduler.inline(1)  # 40 µs a sample
    assert not scheduler.inline(4)
    for _ in range(RUN_WINDOW):  # the model really got slower: the window forgets 40 µs
        scheduler._measured(300e-6, 2)
    assert not scheduler.inline(1)


def test_observers_see_an_inline_request_before_it_runs_even_when_it_fails(demo_repository):
    """Live drift and traffic capture see every request before its run, on the loop as on the
    model's thread, whether or not the run succeeds."""
    client = started(create_app(Settings(repository=demo_repository, inline_run_us=10**9)))
    try:
        client.post(INFER, json={"inputs": [tensor()]})  # measures the model: inline after
        model = client.app.state.services.registry.get("digits", None)
        scheduler = model.scheduler
        assert scheduler.can_run_inline(1)
        seen = []
        model.observers.append(lambda tensors, size: seen.append((size, scheduler._busy)))
        assert client.post(INFER, json={"inputs": [tensor(shape=(2, 1, 8, 8))]}).is_success
        run = scheduler.run

        def broken(tensors):  # an ONNX Runtime failure, injected
            raise RuntimeError("kernel failed")

        scheduler.run = broken
        try:
            failed = client.post(INFER, json={"inputs": [tensor()]})
        finally:
            scheduler.run = run
        assert failed.status_code == 500
        assert seen == [(2, 0), (1, 0)]  # before the run took the slot
        assert scheduler._busy == 0
    finally:
        client.__exit__(None, None, None)


def test_statistics_count_requests_answered_in_the_same_loop_step(demo_repository):
    """A request's statistics and metrics are recorded after its answer (metrics.later), and
    whoever reads them flushes first: nothing answered is missing, even within one step."""
    import asyncio

    from prometheus_client import generate_latest

    from service.app import build_services
    from service.protocol.codec import decode_request

    body = orjson.dumps({"inputs": [tensor()]})

    async def main():
        plane = build_services(Settings(repository=demo_repository, inline_run_us=10**9))
        await plane.registry.load_all()
        request = decode_request("digits", None, body, None)
        for _ in range(3):  # the first measures the model on its thread, then inline
            await plane.infer(request)
        assert plane.registry.get("digits", None).scheduler.can_run_inline(1)
        for _ in range(2):  # inline: no await suspends, the deferred figures wait
            await plane.infer(request)
        pending = len(plane.metrics.later)
        stats = plane.statistics("digits").model_stats[0]
        text = generate_latest(plane.metrics.registry).decode()
        await plane.registry.close()
        return pending, stats, text

    pending, stats, text = asyncio.run(main())
    assert pending > 0
    assert stats.inference_stats.success.count == 5
    assert stats.execution_count == 5
    assert 'bnserve_request_batch_size_count{model="digits"} 5.0' in text
